"""ftlab: transfer learning and fine-tuning as transformations of parameter pytrees."""
