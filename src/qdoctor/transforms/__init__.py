"""Function-preserving transforms: channel-scale folding, smoothing, planted outliers."""
