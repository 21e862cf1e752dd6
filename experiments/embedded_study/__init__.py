"""The embedded study: CovMatch on the embedded shapes data, tuned on val and scored once on test
(``python -m experiments.embedded_study``; results in ``results/study.md``)."""
