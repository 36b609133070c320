"""Ray actors: one rank of an FSDP2 process group (``worker``) and a group of them (``group``)."""
