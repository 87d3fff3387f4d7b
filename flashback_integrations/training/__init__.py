"""Training and evaluation: docs/method.md's examples, the PEFT set-up, target-token scoring (shared by the trainer
and the perplexity rows), pickle-free checkpoints, the trainer and ``flashback eval ppl``."""
