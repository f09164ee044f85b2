"""Site side of fedembed: the Flower ClientApp, local training, privacy and the egress audit."""
