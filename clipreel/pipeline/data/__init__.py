"""What the stages read: video lists, frame sampling, decoding, preprocessing, augmentation, loaders, the synthetic world."""
