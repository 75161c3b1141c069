"""sparsediff.calibration: the `sparsediff calibrate` command and its prompt sets.

measure.py   candidate grid, step sampling, CalibrationController (per-call measurement)
select.py    CalibrationStats and the selection of thresholds, dense layers and dense steps
driver.py    plan and input checks, resumable runs, profile + report, validation
cli.py       the command line
bench_overhead.py   GPU cost of calibrating vs dense generation (python -m sparsediff.calibration.bench_overhead)
prompts/     bundled prompt sets: video, image, toy-shapes, each with a held-out .holdout.txt
"""
