"""After training, from run folders alone: comparisons (tables, figures), evaluation, prediction and export of saved prompts."""
