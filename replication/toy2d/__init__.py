"""The exact 2-D tier: a Gaussian-mixture target whose rectified-flow teacher is known in closed form."""
