"""Training glue: recipes, the trainer loop, checkpoints. May import accelerate and deepspeed; the model library
(`zidong.models`) must not depend on anything here."""
