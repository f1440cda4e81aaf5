using ActorVmm.Devices;
using ActorVmm.Lapic;
using ActorVmm.LibVmm;
using ActorVmm.Vcpu;

namespace ActorVmm.Bench;

/// <summary>
/// The least a user-space local APIC can cost, the limit the emulated backend is compared with: one
/// plain loop per vcpu thread, no actors, each vcpu's exits handled on its own thread by its
/// <see cref="LocalApic"/> model (under a lock; IPIs delivered after the sender's lock is released).
/// A halted vcpu spins until an IPI marks it; a vcpu in the guest is kicked, as the vcpu actor's is.
/// The same loop runs stand-in vcpus (ipipath: the host's share alone) and real KVM vcpus (lapic:
/// the whole round trip, exits included). It knows what the benchmark guests do: xAPIC MMIO, x2APIC
/// and APIC-base MSRs, HLT, INIT-SIPI, the marker port and the debug-exit port; anything else ends
/// the run with an error. There is no CR8 sync.
/// Timer service: a deadline that has passed fires before the vcpu's next entry and while it spins
/// halted; one still to come is set on a <see cref="Timer"/> that kicks the vcpu out of the guest
/// then (as the vlapic actor's scheduled timer ends in a kick; to the millisecond, rounded up), so
/// a vcpu that spins in the guest takes its timer interrupt too. A deadline already passed when the
/// guest writes it (a TSC-deadline write) fires inside the model's register write, as it does under
/// the vlapic actor.
/// </summary>
internal sealed class BareApicLoop
{
    private readonly BareCpu[] _cpus;
    private readonly ManualResetEventSlim _ended = new();

    /// <param name="vcpus">vcpu 0 is the BSP and runs first; the others wait for INIT-SIPI</param>
    /// <param name="marks">takes the guest's writes to the marker port, if it makes any</param>
    /// <param name="options">the local APICs' options (the emulated backend's, for a real VM)</param>
    /// <param name="clock">the local APICs' time; the clock <paramref name="options"/> paired with the
    /// guest's TSC, when they did (a TSC deadline is compared with the TSC it computes from it)</param>
    public BareApicLoop(IReadOnlyList<IVcpu> vcpus, Marks? marks = null, LapicOptions? options = null, IDeviceClock? clock = null)
    {
        clock ??= new MonotonicClock();
        _cpus = new BareCpu[vcpus.Count];
        for (var i = 0; i < vcpus.Count; i++) _cpus[i] = new BareCpu(vcpus[i], _cpus, _ended, clock, marks, options);
    }

    /// <summary>Runs until a vcpu writes the debug-exit port; throws when a vcpu failed or the run
    /// outlasted <paramref name="limit"/> (saying where each vcpu was, with <paramref name="describe"/>).</summary>
    public void Run(TimeSpan limit, Func<int, string>? describe = null)
    {
        var threads = _cpus.Select(c => new Thread(c.Loop) { IsBackground = true, Name = $"bare-vcpu-{c.Vcpu.Id}" }).ToArray();
        foreach (var t in threads) t.Start();
        var until = DateTime.UtcNow + limit;
        foreach (var t in threads)
        {
            var left = until - DateTime.UtcNow;
            if (t.Join(left > TimeSpan.Zero ? left : TimeSpan.Zero)) continue;
            // Stop them all (a halted vcpu sees _ended, one in the guest is kicked out), so that
            // the vcpus can be asked where they were: KVM answers no register read during KVM_RUN.
            var halted = _cpus.Select(c => c.Halted).ToArray();
            _ended.Set();
            foreach (var c in _cpus) c.Vcpu.Kick();
            var stopped = threads.Select(x => x.Join(TimeSpan.FromSeconds(5))).ToArray();
            throw new TimeoutException($"the bare loop did not end within {limit.TotalSeconds:F0} s: " + string.Join("; ", _cpus.Select((c, i) =>
                $"vcpu {c.Vcpu.Id}: {c.Exits} exits, {(halted[i] ? "halted" : "not halted")}" +
                (describe is null ? "" : ", " + (stopped[i] ? describe(c.Vcpu.Id) : "did not leave the guest")))));
        }
        foreach (var c in _cpus)
            if (c.Failure is { } e) throw new InvalidOperationException($"bare vcpu {c.Vcpu.Id} failed: {e.Message}", e);
    }

    /// <summary>One vcpu of the loop and its local APIC model.</summary>
    private sealed class BareCpu : ILapicEvents
    {
        private readonly BareCpu[] _all;
        private readonly ManualResetEventSlim _ended;
        private readonly Marks? _marks;
        private readonly IDeviceClock _clock;
        private readonly Timer _alarm;
        private readonly object _gate = new();
        private readonly List<Ipi> _outbox = [];
        private int _wake;
        private volatile bool _halted;
        private volatile bool _started;
        private bool _initReceived;
        private int _startupVector = -1;
        /// <summary>The deadline the alarm is set for (null: none); only this vcpu's thread sets it.</summary>
        private TimeSpan? _armed;
        /// <summary><see cref="_armed"/> in clock ticks, <see cref="long.MaxValue"/> for none: what the
        /// loop looks at without the lock.</summary>
        private long _dueTicks = long.MaxValue;
        /// <summary>The alarm's rings so far (counted on the timer's thread), and as of its last setting:
        /// a ring before the deadline (the model's time and the timer's disagree) sets it again.</summary>
        private int _rings;
        private int _ringsSeen;

        public IVcpu Vcpu { get; }
        public LocalApic Apic { get; }
        public long Exits { get; private set; }
        public bool Halted => _halted;
        public Exception? Failure { get; private set; }

        public BareCpu(IVcpu vcpu, BareCpu[] all, ManualResetEventSlim ended, IDeviceClock clock, Marks? marks, LapicOptions? options)
        {
            Vcpu = vcpu;
            _all = all;
            _ended = ended;
            _marks = marks;
            _clock = clock;
            _alarm = new Timer(_ =>
            {
                Interlocked.Increment(ref _rings);
                Vcpu.Kick();
            });
            Apic = new LocalApic((uint)vcpu.Id, this, clock, options, bsp: vcpu.Id == 0);
            _started = vcpu.Id == 0;
        }

        public void Loop()
        {
            try
            {
                Vcpu.BindToCurrentThread();
                if (!WaitForStartup()) return;
                while (true)
                {
                    // Announce the entry first: an IPI delivered after the look below kicks this vcpu.
                    Vcpu.PrepareToRun();
                    lock (_gate)
                    {
                        ServeTimer();
                        var pending = Apic.PendingInterrupt();
                        if (pending is { } vector && Vcpu.ReadyForInterruptInjection)
                        {
                            Apic.InterruptAccepted((byte)vector);
                            Vcpu.InjectInterrupt((byte)vector);
                            pending = Apic.PendingInterrupt();
                        }
                        Vcpu.RequestInterruptWindow = pending is not null;
                    }
                    var exit = Vcpu.Run();
                    Exits++;
                    if (!Handle(exit)) return;
                    Flush();
                }
            }
            catch (Exception e)
            {
                Failure = e;
                EndAll();
            }
            finally
            {
                // No kick after this: the vcpu is disposed once the run is over.
                using var disposed = new ManualResetEvent(false);
                if (_alarm.Dispose(disposed)) disposed.WaitOne();
            }
        }

        /// <summary>Under the lock: fires the model's timer if its deadline has passed (SDM Vol 3A
        /// §10.5.4), then sets the alarm for the next one.</summary>
        private void ServeTimer()
        {
            var deadline = Apic.NextDeadline;
            if (deadline is { } due && due <= _clock.Now)
            {
                Apic.OnDeadline();
                deadline = Apic.NextDeadline;
            }
            ArmAlarm(deadline);
        }

        /// <summary>Sets the alarm for <paramref name="deadline"/>, if that changed or the alarm rang since
        /// it was set (whole milliseconds, rounded up: a <see cref="Timer"/>'s unit).</summary>
        private void ArmAlarm(TimeSpan? deadline)
        {
            var rings = Volatile.Read(ref _rings);
            if (deadline == _armed && rings == _ringsSeen) return;
            _armed = deadline;
            _ringsSeen = rings;
            Volatile.Write(ref _dueTicks, deadline?.Ticks ?? long.MaxValue);
            if (deadline is not { } due)
            {
                _alarm.Change(Timeout.Infinite, Timeout.Infinite);
                return;
            }
            var delay = (due - _clock.Now).TotalMilliseconds;
            _alarm.Change(delay > 0 ? (long)Math.Ceiling(delay) : 0, Timeout.Infinite);
        }

        /// <summary>While halted: fires a deadline that has passed; true when that left an interrupt to take.</summary>
        private bool TimerWakes()
        {
            var due = Volatile.Read(ref _dueTicks);
            if (due == long.MaxValue || due > _clock.Now.Ticks) return false;
            lock (_gate)
            {
                ServeTimer();
                return Apic.PendingInterrupt() is not null;
            }
        }

        /// <summary>An AP waits for its SIPI (after INIT), then starts in real mode at the vector's page.</summary>
        private bool WaitForStartup()
        {
            while (!_started)
            {
                if (_ended.IsSet) return false;
                Thread.SpinWait(20);
            }
            if (Vcpu.Id == 0) return true;
            lock (_gate)
            {
                if (_initReceived) ProcessorInit.ApplyInit(Vcpu);
                ProcessorInit.ApplyStartup(Vcpu, (byte)_startupVector);
            }
            return true;
        }

        /// <summary>False when the VM ends (the debug-exit port, or another vcpu ended it).</summary>
        private bool Handle(VmExit exit)
        {
            switch (exit)
            {
                case VmExit.Mmio m when m.Address - LocalApic.DefaultBaseAddress < 0x1000:
                    lock (_gate)
                    {
                        if (m.IsWrite) Apic.WriteMmio(m.Address - LocalApic.DefaultBaseAddress, m.Length, m.Value);
                        else Vcpu.CompleteMmioRead(Apic.ReadMmio(m.Address - LocalApic.DefaultBaseAddress, m.Length));
                    }
                    return true;
                case VmExit.MsrRead r:
                    bool read;
                    ulong value;
                    lock (_gate) read = Apic.ReadMsr(r.Index, out value);
                    Vcpu.CompleteMsrRead(value, !read);
                    return true;
                case VmExit.MsrWrite w:
                    bool written;
                    lock (_gate) written = Apic.WriteMsr(w.Index, w.Value);
                    Vcpu.CompleteMsrWrite(!written);
                    return true;
                case VmExit.Hlt:
                    _halted = true;
                    try
                    {
                        while (Interlocked.Exchange(ref _wake, 0) == 0)
                        {
                            if (_ended.IsSet) return false;
                            if (TimerWakes()) break;
                            Thread.SpinWait(20);
                        }
                    }
                    finally
                    {
                        _halted = false;
                    }
                    return true;
                case VmExit.Io { IsOut: true, Port: BenchGuest.MarkPort } io:
                    _marks?.Write(0, io.Size, io.Value);
                    return true;
                case VmExit.Io { IsOut: true, Port: BenchGuest.DebugExitPort }:
                    EndAll();
                    return false;
                case VmExit.IrqWindowOpen:
                    return true; // the loop injects before the next entry
                case VmExit.Intr:
                    return !_ended.IsSet;
                default:
                    throw new InvalidOperationException($"vcpu {Vcpu.Id}: unexpected exit {exit}");
            }
        }

        /// <summary>The VM ends: the other vcpus stop, halted or kicked out of the guest.</summary>
        private void EndAll()
        {
            _ended.Set();
            foreach (var other in _all)
                if (other != this) other.Vcpu.Kick();
        }

        /// <summary>IPIs the model sent, delivered with its own lock released (two vcpus sending to
        /// each other must not take the two locks in opposite orders).</summary>
        private void Flush()
        {
            if (_outbox.Count == 0) return;
            foreach (var ipi in _outbox)
            foreach (var target in _all)
            {
                if (ipi.Shorthand != Shorthand.None || !target.Apic.MatchesPhysical(ipi.Destination)) continue;
                lock (target._gate) target.Apic.Deliver(ipi.Mode, ipi.Vector, ipi.Level, ipi.TriggerMode);
                Volatile.Write(ref target._wake, 1);
                if (!target._halted) target.Vcpu.Kick(); // a halted vcpu sees _wake; one in the guest must exit
            }
            _outbox.Clear();
        }

        public void SendIpi(Ipi ipi) => _outbox.Add(ipi);

        public void LevelEoi(byte vector) { }

        /// <summary>Runs under this vcpu's lock (a sender delivering INIT or SIPI).</summary>
        public void VcpuEvent(VcpuEventKind kind, byte vector)
        {
            switch (kind)
            {
                case VcpuEventKind.Init when Vcpu.Id != 0 && !_started:
                    _initReceived = true;
                    break;
                case VcpuEventKind.StartUp when Vcpu.Id != 0 && !_started:
                    _startupVector = vector;
                    _started = true;
                    break;
            }
        }
    }
}
