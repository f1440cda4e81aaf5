using System.Diagnostics;

namespace ActorVmm.Devices;

/// <summary>
/// Monotonic time as a device model sees it. Models never read the wall clock: time is passed
/// in, so timers (PIT, RTC, LAPIC) are testable with a <see cref="ManualClock"/> or Akka's
/// virtual scheduler.
/// </summary>
public interface IDeviceClock
{
    TimeSpan Now { get; }
}

/// <summary>
/// The host's monotonic clock (Stopwatch), starting at zero when created, or at a given time
/// (<see cref="StartingAt"/>): a VM restored from a snapshot continues from the Now it was saved
/// at, so every deadline in its state records (on this clock) stays right and guest time never
/// goes back.
/// </summary>
public sealed class MonotonicClock : IDeviceClock
{
    private readonly long _start = Stopwatch.GetTimestamp();
    private readonly TimeSpan _origin;

    public MonotonicClock()
    {
    }

    private MonotonicClock(TimeSpan origin) => _origin = origin;

    /// <summary>A monotonic clock whose <see cref="Now"/> starts at <paramref name="now"/> (not negative)
    /// and runs with the host's monotonic time from here on.</summary>
    public static MonotonicClock StartingAt(TimeSpan now)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(now, TimeSpan.Zero);
        return new MonotonicClock(now);
    }

    public TimeSpan Now => _origin + Stopwatch.GetElapsedTime(_start);
}

/// <summary>A clock that moves only when told to (model tests).</summary>
public sealed class ManualClock : IDeviceClock
{
    public TimeSpan Now { get; set; }
    public void Advance(TimeSpan by) => Now += by;
}

/// <summary>
/// A model with a timer. Its actor asks <see cref="NextDeadline"/> after every access and after
/// every callback, schedules one timer for it (replacing the previous one), and calls
/// <see cref="OnDeadline"/> when it fires. Models must tolerate early and late callbacks: they
/// compare against the clock, never count callbacks.
/// </summary>
public interface ITimedDevice
{
    /// <summary>When the model next needs <see cref="OnDeadline"/>, in clock time; null if never.</summary>
    TimeSpan? NextDeadline { get; }

    /// <summary>Brings the model up to the clock's now (raise interrupts, reload counters).</summary>
    void OnDeadline();
}
