class Scheduler:
    def __init__(self, entry, config):
        pass

    def close(self, reason):
        pass
