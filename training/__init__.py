"""The Composer side: model builder, loaders over stage indexes, the stage loop, evaluation,
checkpoints and recipes (training/recipes/*.yaml)."""
