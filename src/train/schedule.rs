//! Learning-rate schedules as transformers' `get_scheduler` computes them.
