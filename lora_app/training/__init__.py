"""Training: settings (config), the recipe (trainer), its CLI, the run store and the detached worker."""
