"""Training a CLIP contrastively (`clipsearch train`), kept apart from the search engine: nothing
outside this package but the CLI's registration of the command imports it.

- `loop`: `train` (the epoch loop, the step, held-out recall after each epoch);
- `options`: `TrainOptions`, `TrainingError` and the checks that refuse a run before it starts;
- `build`: the model a run starts from (preset, ``config.json`` or checkpoint), frozen towers,
  the optimiser and its schedule;
- `data`: image–caption pairs from files or from synthetic scenes, as datasets and loaders;
- `checkpoint`: the output directory (a loadable model, resume state, metrics, options);
- `scenes`: the synthetic scenes the bundled ``demo`` model learned from and the tests check
  search against;
- `command`: the typer command.

This module imports nothing, so that registering the command costs the CLI's start-up no torch.
The loss itself is `clipsearch.clip.loss`, beside the model it trains.
"""
