"""`autounet select`: rank configurations and ensembles by cross-validation Dice and decide post-processing."""
