"""The built-in synthetic world: videos of shapes that move, grow, turn or change colour, and clipreel-synth."""
