"""Small, pure data stages: sources -> tokenize -> pack -> mask -> collate -> loader."""
