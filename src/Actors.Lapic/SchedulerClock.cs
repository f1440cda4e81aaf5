using Akka.Actor;
using ActorVmm.Devices;

namespace ActorVmm.Lapic;

/// <summary>
/// Device time read from an Akka scheduler's <see cref="ITimeProvider.Now"/>, starting at zero when
/// created. Under TestKit's TestScheduler this is virtual time, advanced by <c>Advance</c> together
/// with the timers it fires; under the default scheduler it is wall-clock time, so production VMs
/// should pass their <see cref="MonotonicClock"/> instead.
/// </summary>
public sealed class SchedulerClock(IScheduler scheduler) : IDeviceClock
{
    private readonly DateTimeOffset _origin = scheduler.Now;

    public TimeSpan Now => scheduler.Now - _origin;
}
