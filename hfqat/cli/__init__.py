"""Stage 6, commands: `hfqat train|ptq|eval|export|push|demo`, YAML recipes, data loading and evaluation.
Owns the user-facing entry points that run the whole pipeline end to end.
May import: every other stage."""
