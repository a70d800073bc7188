"""OfflineTourGuide library: all real logic lives here. Never imports prefect."""
