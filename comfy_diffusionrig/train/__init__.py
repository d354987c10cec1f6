"""Training: the loop (stage 1 and 2, DDP), the train command, datasets, albums of one person, dataset preparation."""
