"""`sdray batch-generate`: offline text-to-image over prompt files with a Ray Data actor pool of samplers."""
