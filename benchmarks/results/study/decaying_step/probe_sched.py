import keras
from keras import ops


class InvSqrt(keras.optimizers.schedules.LearningRateSchedule):
    """lr0 / sqrt(1 + t / tau), floored at `floor`."""

    def __init__(self, lr0, tau, floor=0.0):
        self.lr0, self.tau, self.floor = lr0, tau, floor

    def __call__(self, step):
        t = ops.cast(step, "float32")
        return ops.maximum(self.lr0 / ops.sqrt(1.0 + t / self.tau), self.floor)

    def get_config(self):
        return {"lr0": self.lr0, "tau": self.tau, "floor": self.floor}


class InvTimeFloor(keras.optimizers.schedules.LearningRateSchedule):
    """max(floor, lr0 / (1 + t / tau))."""

    def __init__(self, lr0, tau, floor):
        self.lr0, self.tau, self.floor = lr0, tau, floor

    def __call__(self, step):
        t = ops.cast(step, "float32")
        return ops.maximum(self.lr0 / (1.0 + t / self.tau), self.floor)

    def get_config(self):
        return {"lr0": self.lr0, "tau": self.tau, "floor": self.floor}
