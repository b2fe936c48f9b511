"""Task data authored by eval/tasks/build.py (a package only so that setuptools ships the .jsonl files)."""
