"""Execution: the executor process (`executor`), its claims on queued runs (`claims`), one run's
execution (`run`) and the model providers it streams from (`providers`). Imports run one way:
the executor imports the run, the run imports claims and providers, none of them the API."""
