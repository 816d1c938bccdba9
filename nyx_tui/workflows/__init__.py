"""Training workflows on the job queue: LR range tests, quality reports (and later multi-stage runs, sweeps)."""
