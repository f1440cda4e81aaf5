using Akka.Actor;

namespace ActorVmm.Devices;

/// <summary>
/// Fault injection: messages every VM actor understands so a test (or `actorvmm ctl fault`) can
/// break a live VM on purpose and watch supervision handle it.
/// </summary>
public static class FaultProtocol
{
    public interface IFaultMessage : IVcpuNotify;

    /// <summary>Makes the receiving actor throw <see cref="InjectedFaultException"/> (its supervisor decides).</summary>
    public sealed record Crash(string Reason) : IFaultMessage;

    /// <summary>The longest <see cref="Stall"/>: a stall is a fault to watch, not a way to hang a host.</summary>
    public static readonly TimeSpan MaxStall = TimeSpan.FromSeconds(60);

    /// <summary>
    /// Stalls the receiver's thread for <paramref name="Duration"/> (at most <see cref="MaxStall"/>),
    /// as a host that descheduled it would: a vcpu neither runs its guest nor answers anything
    /// (EPT invalidation acks, interrupts, registers) until the stall ends. Answered
    /// <see cref="Injected"/> once it is over.
    /// </summary>
    public sealed record Stall(TimeSpan Duration, string Reason) : IFaultMessage;

    /// <summary>
    /// Makes the next <paramref name="Count"/> nested page faults fail (only those on the page of
    /// <paramref name="Gpa"/>, when given) as if the backing could not be read: the vmspace fails,
    /// and the VM stops with a report naming the fault. Answered <see cref="Injected"/> when armed;
    /// refused with <see cref="NotInjected"/> by a vmspace without demand paging (it takes no faults).
    /// </summary>
    public sealed record FailNestedPageFaults(int Count, ulong? Gpa, string Reason) : IFaultMessage;

    /// <summary>A fault was injected (a stall is over, a page fault failure is armed).</summary>
    public sealed record Injected(string What) : IFaultMessage;

    public sealed record NotInjected(string Why) : IFaultMessage;

    /// <summary>Published on the actor system's event stream as a stall begins (the actor's thread is
    /// stopped from now on, for <paramref name="Duration"/>): a watcher knows the fault is in effect.</summary>
    /// <param name="Actor">the stalled actor's path, without address</param>
    /// <param name="Duration">how long it stays stalled</param>
    /// <param name="Reason">why, as the injector gave it</param>
    /// <param name="Timestamp">when its thread stopped (<see cref="System.Diagnostics.Stopwatch.GetTimestamp"/>)</param>
    public sealed record StallStarted(string Actor, TimeSpan Duration, string Reason, long Timestamp);

    /// <summary>A stall's duration within 0 to <see cref="MaxStall"/>.</summary>
    public static TimeSpan Clamp(TimeSpan duration) =>
        duration < TimeSpan.Zero ? TimeSpan.Zero : duration > MaxStall ? MaxStall : duration;

    /// <summary>Runs a stall on the calling thread (the actor's, <paramref name="context"/>), after
    /// publishing <see cref="StallStarted"/>: the clamped duration actually slept. For actors with
    /// a thread of their own (a vcpu, the vmspace).</summary>
    internal static TimeSpan StallHere(Stall stall, IActorContext context)
    {
        var duration = Clamp(stall.Duration);
        context.System.EventStream.Publish(new StallStarted(context.Self.Path.ToStringWithoutAddress(), duration, stall.Reason,
            System.Diagnostics.Stopwatch.GetTimestamp()));
        Thread.Sleep(duration);
        return duration;
    }
}

/// <summary>
/// What a VM actor does with the fault messages, in one place: <see cref="FaultProtocol.Crash"/>
/// throws <see cref="InjectedFaultException"/> (the actor's supervisor decides);
/// <see cref="FaultProtocol.Stall"/> stops the actor for the stall's duration (at most
/// <see cref="FaultProtocol.MaxStall"/>), publishes <see cref="FaultProtocol.StallStarted"/> as it
/// begins and answers <see cref="FaultProtocol.Injected"/> to the asker when it is over.
/// </summary>
public static class Faults
{
    /// <summary>The handler of <see cref="FaultProtocol.Crash"/>: never returns.</summary>
    [System.Diagnostics.CodeAnalysis.DoesNotReturn]
    public static void Crash(FaultProtocol.Crash crash) => throw new InjectedFaultException(crash.Reason);

    /// <summary>
    /// A stall on the calling thread, for an actor with a thread of its own (a vcpu, the vmspace):
    /// the thread sleeps, so nothing of the actor runs until it is over; then the sender of the
    /// message being handled is answered <c>Injected("{who} stalled for N ms")</c>.
    /// </summary>
    /// <param name="stall">the message</param>
    /// <param name="context">the actor's context, inside its handling of <paramref name="stall"/></param>
    /// <param name="who">how the answer names the actor ("vcpu 0", "vmspace")</param>
    public static void StallThread(FaultProtocol.Stall stall, IActorContext context, string who)
    {
        var asker = context.Sender;
        var slept = FaultProtocol.StallHere(stall, context);
        asker.Tell(new FaultProtocol.Injected($"{who} stalled for {slept.TotalMilliseconds:0} ms"), context.Self);
    }

    /// <summary>
    /// A stall that blocks no thread, for an actor that may run on whatever thread sent to it (an
    /// InlineDispatcher, which must not sleep in its place): the actor stashes everything it is sent
    /// (its own timers' messages included) for the stall's duration, then unstashes it, in order,
    /// and answers the asker as <see cref="StallThread"/> does. The actor needs a stash and timers.
    /// </summary>
    /// <param name="stall">the message</param>
    /// <param name="context">the actor's context, inside its handling of <paramref name="stall"/></param>
    /// <param name="stash">the actor's stash</param>
    /// <param name="timers">the actor's timers (the end of the stall is one of them)</param>
    /// <param name="who">how the answer names the actor</param>
    public static void StallStashing(FaultProtocol.Stall stall, IActorContext context, IStash stash, ITimerScheduler timers, string who)
    {
        var duration = FaultProtocol.Clamp(stall.Duration);
        var asker = context.Sender;
        context.System.EventStream.Publish(new FaultProtocol.StallStarted(context.Self.Path.ToStringWithoutAddress(), duration,
            stall.Reason, System.Diagnostics.Stopwatch.GetTimestamp()));
        timers.StartSingleTimer(StallOver.Instance, StallOver.Instance, duration);
        context.BecomeStacked(message =>
        {
            if (message is not StallOver)
            {
                stash.Stash();
                return true;
            }
            context.UnbecomeStacked();
            stash.UnstashAll();
            asker.Tell(new FaultProtocol.Injected($"{who} stalled for {duration.TotalMilliseconds:0} ms"), context.Self);
            return true;
        });
    }

    /// <summary>The end of a <see cref="StallStashing"/> stall (not traced: the actor's own timer).</summary>
    private sealed class StallOver : Tracing.INotTraced
    {
        public static readonly StallOver Instance = new();
    }
}

/// <summary>The exception an actor throws on <see cref="FaultProtocol.Crash"/>.</summary>
public sealed class InjectedFaultException(string reason) : Exception($"injected fault: {reason}");

/// <summary>
/// A component's own invariant broke (its state and the kernel's, or two of its own records,
/// disagree beyond a race): nothing it holds can be trusted, so nothing is rebuilt from it and the
/// VM stops with a report naming it, whatever supervision does for other failures.
/// </summary>
public abstract class InvariantViolationException(string message) : Exception(message);

/// <summary>
/// A device model whose state can be saved when its actor fails and restored into the next
/// incarnation (UART FIFO contents, interrupt line state...): the device restarts from its last
/// state record instead of from power-on.
/// </summary>
public interface IStatefulDevice : IBusDevice
{
    /// <summary>The model's state record (an immutable record: UartState, I8042State, ...).</summary>
    object SaveState();
}
