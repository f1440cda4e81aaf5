using System.Diagnostics;
using Akka.Actor;
using Akka.Configuration;
using Akka.Dispatch;
using Akka.Event;
using ActorVmm.LibVmm;

namespace ActorVmm.Devices.Timing;

/// <summary>
/// Akka's scheduler for VM hosts (<c>akka.scheduler.implementation</c>): every timer of every actor
/// (LAPIC, PIT, RTC, Akka's own) fires from one thread within tens of microseconds of its time.
/// Akka's default scheduler moves in ticks of at least 10 ms, so a 1 kHz guest timer would fire at
/// about 100 Hz. A deadline queue and a <see cref="PreciseSleeper"/> (ppoll with a nanosecond
/// timeout, woken when an earlier deadline arrives) instead of a wheel of ticks.
/// <para>Repeated work keeps its rate (the next time is the last deadline plus the interval) unless
/// it fell a whole interval behind; then it starts again from now. Cancelled work is skipped when
/// due, and swept out when the queue fills with it (timers re-armed often cancel their old one).</para>
/// </summary>
public sealed class PreciseScheduler : SchedulerBase, IDateTimeOffsetNowTimeProvider, IDisposable
{
    private sealed class Work(IRunnable action, ICancelable? cancelable, long intervalTicks)
    {
        public readonly IRunnable Action = action;
        public readonly ICancelable? Cancelable = cancelable;
        public readonly long IntervalTicks = intervalTicks;
        public bool Cancelled => Cancelable?.IsCancellationRequested ?? false;
    }

    private sealed class ActionRunnable(Action action) : IRunnable
    {
        public void Run() => action();
#if NET6_0_OR_GREATER
        public void Execute() => action();
#endif
    }

    private sealed class TellRunnable(ICanTell receiver, object message, IActorRef sender) : IRunnable
    {
        public void Run() => receiver.Tell(message, sender);
#if NET6_0_OR_GREATER
        public void Execute() => Run();
#endif
    }

    private const int SweepAbove = 4096;

    private readonly object _gate = new();
    // Deadline in Stopwatch ticks, then arrival order: equal deadlines run first-in first-out.
    private readonly PriorityQueue<Work, (long Deadline, long Seq)> _queue = new();
    private readonly PreciseSleeper _sleeper = new();
    private readonly Thread _thread;
    private readonly long _start = Stopwatch.GetTimestamp();
    private long _seq;
    // The deadline the timer thread sleeps towards; MinValue while it is awake (it will look at the
    // queue again before it sleeps, so nobody needs to wake it).
    private long _sleepingUntil = long.MinValue;
    private volatile bool _stopping;

    public PreciseScheduler(Config config, ILoggingAdapter log) : base(config, log)
    {
        _thread = new Thread(Loop) { IsBackground = true, Name = "actorvmm-timers" };
        _thread.Start();
    }

    protected override DateTimeOffset TimeNow => DateTimeOffset.UtcNow;
    public override TimeSpan MonotonicClock => Stopwatch.GetElapsedTime(_start);
    public override TimeSpan HighResMonotonicClock => Stopwatch.GetElapsedTime(_start);

    /// <summary>Work waiting in the queue, cancelled or not (for tests and stats).</summary>
    public int Queued
    {
        get { lock (_gate) return _queue.Count; }
    }

    protected override void InternalScheduleTellOnce(TimeSpan delay, ICanTell receiver, object message, IActorRef sender, ICancelable cancelable) =>
        Add(delay, TimeSpan.Zero, new TellRunnable(receiver, message, sender), cancelable);

    protected override void InternalScheduleTellRepeatedly(TimeSpan initialDelay, TimeSpan interval, ICanTell receiver, object message,
        IActorRef sender, ICancelable cancelable) =>
        Add(initialDelay, interval, new TellRunnable(receiver, message, sender), cancelable);

    protected override void InternalScheduleOnce(TimeSpan delay, Action action, ICancelable cancelable) =>
        Add(delay, TimeSpan.Zero, new ActionRunnable(action), cancelable);

    protected override void InternalScheduleOnce(TimeSpan delay, IRunnable action, ICancelable cancelable) =>
        Add(delay, TimeSpan.Zero, action, cancelable);

    protected override void InternalScheduleRepeatedly(TimeSpan initialDelay, TimeSpan interval, Action action, ICancelable cancelable) =>
        Add(initialDelay, interval, new ActionRunnable(action), cancelable);

    protected override void InternalScheduleRepeatedly(TimeSpan initialDelay, TimeSpan interval, IRunnable action, ICancelable cancelable) =>
        Add(initialDelay, interval, action, cancelable);

    private static long ToStopwatchTicks(TimeSpan t) =>
        t <= TimeSpan.Zero ? 0 : (long)Math.Min(t.Ticks * (double)Stopwatch.Frequency / TimeSpan.TicksPerSecond, long.MaxValue / 4);

    private void Add(TimeSpan delay, TimeSpan interval, IRunnable action, ICancelable? cancelable)
    {
        if (_stopping) throw new SchedulerException("the scheduler is shutting down");
        var deadline = Stopwatch.GetTimestamp() + ToStopwatchTicks(delay);
        var work = new Work(action, cancelable, interval > TimeSpan.Zero ? Math.Max(1, ToStopwatchTicks(interval)) : 0);
        bool wake;
        lock (_gate)
        {
            Enqueue(work, deadline);
            if (_queue.Count > SweepAbove) Sweep();
            wake = deadline < _sleepingUntil;
        }
        if (wake) _sleeper.Wake();
    }

    private void Enqueue(Work work, long deadline) => _queue.Enqueue(work, (deadline, _seq++));

    /// <summary>Drops cancelled work (under the gate).</summary>
    private void Sweep()
    {
        var live = _queue.UnorderedItems.Where(i => !i.Element.Cancelled).ToList();
        _queue.Clear();
        foreach (var (work, priority) in live) _queue.Enqueue(work, priority);
    }

    private void Loop()
    {
        var due = new List<(Work Work, long Deadline)>();
        while (!_stopping)
        {
            var now = Stopwatch.GetTimestamp();
            long next;
            lock (_gate)
            {
                while (_queue.TryPeek(out var work, out var at) && at.Deadline <= now)
                {
                    _queue.Dequeue();
                    if (!work.Cancelled) due.Add((work, at.Deadline));
                }
                // Repeated work goes back before anything runs, so a Cancel from inside it holds.
                foreach (var (work, deadline) in due)
                {
                    if (work.IntervalTicks == 0) continue;
                    var again = deadline + work.IntervalTicks;
                    Enqueue(work, again > now ? again : now + work.IntervalTicks);
                }
                next = _queue.TryPeek(out _, out var first) ? first.Deadline : long.MaxValue;
                _sleepingUntil = due.Count > 0 ? long.MinValue : next; // not asleep while running work
            }
            foreach (var (work, _) in due)
            {
                try
                {
                    work.Action.Run();
                }
                catch (SchedulerException)
                {
                    // the receiver is gone
                }
                catch (Exception e)
                {
                    Log.Error(e, "scheduled work failed: {0}", work.Action);
                }
            }
            if (due.Count > 0)
            {
                due.Clear();
                continue; // look at the queue again: running took time
            }
            var wait = next == long.MaxValue ? (TimeSpan?)null : Stopwatch.GetElapsedTime(now, next);
            _sleeper.Sleep(wait);
            lock (_gate) _sleepingUntil = long.MinValue;
        }
    }

    public void Dispose()
    {
        if (_stopping) return;
        _stopping = true;
        _sleeper.Wake();
        if (Thread.CurrentThread != _thread) _thread.Join(TimeSpan.FromSeconds(5));
        _sleeper.Dispose();
    }
}
