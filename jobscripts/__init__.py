"""Job-script templates (package data), one per scheduler."""
