"""The input stage: records in, parts of windows out.

Parsing, the assignment, dead letters, closing windows, publishing parts, commits.
"""
