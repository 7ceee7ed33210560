"""Training: `data` (clip folder -> cached face crops, deterministic batches), `losses`,
`trainer` (one process or torchrun/DDP), `plots`. Nothing is imported here: torch loads only
when a module is used."""
