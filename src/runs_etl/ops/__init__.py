"""Running runs-etl unattended and in front of people: scheduler, writer lock, logs, console."""
