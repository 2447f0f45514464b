"""The embedded model family: a dual encoder, a diffusion generator and an oracle, trained on the world."""
