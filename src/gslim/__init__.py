"""gslim: greedy structured channel selection and deployment for torchvision CNNs."""

__version__ = "0.1.0"
