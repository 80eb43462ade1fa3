"""`python -m pretrain`: the main job. Until the Hydra trainer lands, the plain-PyTorch quick start."""

from pretrain.quickstart import main

if __name__ == "__main__":
    main()
