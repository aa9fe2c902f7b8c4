"""Training the built-in VAE (`latentpatch train-vae`): data, losses, the colour check, export. It builds on the
autoencoder interface and the data layer; nothing below it imports it."""
