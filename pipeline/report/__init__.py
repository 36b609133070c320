"""Presenting finished results: report.html and the text summary that run, show and the report print."""
