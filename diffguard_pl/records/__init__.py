"""The records at the centre of an evaluation: every column declared once (columns), and the store that writes,
resumes, collects and merges them (store). Metrics and outputs are made from records alone
(diffguard_pl/jobs/report.py)."""
