"""Stand-in for the pytorch_zoo fork that hpacellseg's model files unpickle into."""
