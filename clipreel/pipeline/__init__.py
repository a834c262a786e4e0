"""The stages of clipreel, as verbs: sources, sampling, decode, preprocess, backbone, extract, synth."""
