"""Small shared services: environment report, progress bars, seeding."""
