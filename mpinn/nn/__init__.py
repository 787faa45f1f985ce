"""nn: the model in pure NumPy: the MLP on flat parameter and gradient vectors,
activations and losses with their derivatives, optimizers, dropout masks, learning-rate
schedules, classification scores. No MPI and no files, ever: of mpinn it imports only
the errors."""
