using Akka.Actor;
using static ActorVmm.Devices.DeviceProtocol;

namespace ActorVmm.Devices;

/// <summary>
/// Props for the device actor of a model with a timer (<see cref="ITimedDevice"/>: PIT, RTC).
/// It is the same actor and protocol as <see cref="DeviceProtocol"/> (size checks, read replies,
/// write credits, stats, health, restart from the last state record); given the clock the model
/// runs on, it also keeps one Akka timer set for the model's <see cref="ITimedDevice.NextDeadline"/>
/// and calls <see cref="ITimedDevice.OnDeadline"/> when it fires, so interrupts come without any
/// bus access. Under TestKit's TestScheduler, pass a clock that reads the scheduler's time.
/// </summary>
public static class TimedDeviceProtocol
{
    /// <param name="name">device name used in messages and traces ("pit")</param>
    /// <param name="clock">the clock the model is built with: its deadlines are in this time</param>
    /// <param name="factory">builds the model; called once per actor incarnation. A model that is
    /// not an <see cref="ITimedDevice"/> simply gets no timer.</param>
    /// <param name="restore">builds the model from the state record its last incarnation saved
    /// (<see cref="IStatefulDevice"/>); null = restart from power-on</param>
    /// <param name="events">receives <see cref="GuestExitRequested"/> / <see cref="GuestResetRequested"/> / <see cref="GuestPowerOffRequested"/>; may be Nobody</param>
    /// <param name="memory">the owner of guest memory (the vmspace), told <see cref="DeviceRestarting"/>
    /// when the device restarts; null = none</param>
    /// <param name="initialState">a state record (from a snapshot) the FIRST incarnation is built
    /// from, by <paramref name="restore"/> instead of <paramref name="factory"/>; its deadlines are on
    /// <paramref name="clock"/> (a restored VM's clock continues from the saved Now), and the timer
    /// is armed for them at once. null = power-on. Requires <paramref name="restore"/>.</param>
    public static Props Props(string name, IDeviceClock clock, Func<IPlatformEvents, IBusDevice> factory,
        Func<IPlatformEvents, object, IBusDevice>? restore, IActorRef events, IActorRef? memory = null, object? initialState = null)
    {
        var cell = InitialCell(name, restore, initialState);
        return Akka.Actor.Props.Create(() => new DeviceActor(name, factory, restore, events, cell, clock, memory));
    }

    public static Props Props(string name, IDeviceClock clock, Func<IPlatformEvents, IBusDevice> factory, IActorRef events) =>
        Props(name, clock, factory, null, events);
}
