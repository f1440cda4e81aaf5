using System.Collections.Concurrent;
using ActorVmm.LibVmm;

namespace ActorVmm.Vcpu.Tests;

/// <summary>
/// A scripted <see cref="IVcpu"/> for actor tests on a machine without /dev/kvm.
///
/// <see cref="Run"/> takes the next exit the test supplied with <see cref="Supply"/>, blocking
/// until there is one: like KVM_RUN while the guest runs, a blocked Run occupies the actor's
/// thread, so the actor handles messages only between runs. <see cref="Kick"/> emulates
/// immediate_exit + signal: it sets a flag, and Run returns <see cref="VmExit.Intr"/> (clearing
/// the flag) whether it was blocked at the time or is entered later. Several kicks before a run
/// coalesce into one Intr, as they do with the real flag.
///
/// <see cref="Dispose"/> makes every run (blocked or later) return Intr, so a test never leaves a
/// thread blocked. Thread-safe: the actor's thread runs the vcpu, the test thread scripts and
/// inspects it; every recorded change wakes <see cref="WaitUntil"/>.
/// </summary>
public sealed class ScriptedVcpu(int id = 0) : IVcpu
{
    private readonly BlockingCollection<VmExit> _exits = new();
    // Holds at most one Intr: the immediate_exit flag in queue form. First in TakeFromAny's
    // array, so a pending kick wins over a scripted exit.
    private readonly BlockingCollection<VmExit> _kick = new();
    private readonly CancellationTokenSource _disposed = new();
    private readonly object _gate = new();

    private int _kickPending;
    private int _kicks;
    private volatile bool _interruptsEnabled = true;
    private volatile bool _readyForInjection = true;

    // Guarded by _gate.
    private int _runs;
    private int _takenInRun; // the Run (by _runs) that last returned an exit
    private int _consumed;
    private int _intrReturned;
    private bool _inRun;
    private bool _requestInterruptWindow;
    private int _interruptWindowRequests;
    private string? _runThreadName;
    private string? _boundThreadName;
    private int _boundThreadId;
    private int _runsOffBoundThread;
    private KvmRegs _regs;
    private KvmSregs _sregs;
    private readonly List<(int Index, ulong Value)> _ioIn = [];
    private readonly List<ulong> _mmioReads = [];
    private readonly List<(ulong Value, bool Fault)> _msrReads = [];
    private readonly List<bool> _msrWrites = [];
    private readonly List<byte> _injected = [];
    private readonly List<(byte Vector, int Consumed, int IntrReturned)> _injectedAt = [];
    private int _nmis;

    public int Id { get; } = id;

    // ---- scripting (test thread) ----

    /// <summary>Queues exits for the vcpu's next runs, in order.</summary>
    public void Supply(params VmExit[] exits)
    {
        foreach (var exit in exits)
        {
            lock (_gate) _untaken++;
            _exits.Add(exit);
        }
    }

    /// <summary>Supplied exits not yet returned by a Run, under <see cref="_gate"/>: unlike the
    /// collection's count, it drops in the same step as <c>_takenInRun</c> is set, so
    /// <see cref="IdleInGuest"/> never sees a Run that took the last exit and has not returned it.</summary>
    private int _untaken;

    /// <summary>Supplied exits not yet taken by a run.</summary>
    public int Pending => _exits.Count;

    /// <summary>Times Run was entered (a run that returned Intr for a kick counts too).</summary>
    public int Runs { get { lock (_gate) return _runs; } }

    /// <summary>Scripted exits Run has returned.</summary>
    public int Consumed { get { lock (_gate) return _consumed; } }

    /// <summary>Runs that returned Intr because of a kick.</summary>
    public int IntrReturned { get { lock (_gate) return _intrReturned; } }

    /// <summary>Whether the vcpu thread is inside Run now (the guest is "running").</summary>
    public bool InRun { get { lock (_gate) return _inRun; } }

    /// <summary>In Run again after handling the last exit it took, with nothing left to return (a Run
    /// that has just taken an exit is still in Run until it returns, so InRun alone says less).</summary>
    public bool IdleInGuest { get { lock (_gate) return _inRun && _untaken == 0 && _runs > _takenInRun; } }

    public int Kicks => Volatile.Read(ref _kicks);

    /// <summary>Name of the thread that last entered Run, read from inside Run.</summary>
    public string? RunThreadName { get { lock (_gate) return _runThreadName; } }

    public string? BoundThreadName { get { lock (_gate) return _boundThreadName; } }

    /// <summary>Runs entered on a thread other than the one bound by BindToCurrentThread (the
    /// kick target of the real vcpu). Zero on a pinned dispatcher.</summary>
    public int RunsOffBoundThread { get { lock (_gate) return _runsOffBoundThread; } }

    public IReadOnlyList<(int Index, ulong Value)> IoInCompletions { get { lock (_gate) return _ioIn.ToArray(); } }
    public IReadOnlyList<ulong> MmioReadCompletions { get { lock (_gate) return _mmioReads.ToArray(); } }
    public IReadOnlyList<(ulong Value, bool Fault)> MsrReadCompletions { get { lock (_gate) return _msrReads.ToArray(); } }
    public IReadOnlyList<bool> MsrWriteCompletions { get { lock (_gate) return _msrWrites.ToArray(); } }
    public IReadOnlyList<byte> Injected { get { lock (_gate) return _injected.ToArray(); } }

    /// <summary>Each injected vector with the scripted exits taken and the kicks returned before it:
    /// when it went in.</summary>
    public IReadOnlyList<(byte Vector, int Consumed, int IntrReturned)> InjectedAt { get { lock (_gate) return _injectedAt.ToArray(); } }

    /// <summary>KVM_NMI calls.</summary>
    public int NmisInjected { get { lock (_gate) return _nmis; } }

    /// <summary>The last value the actor set (the setter is the IVcpu member).</summary>
    public bool InterruptWindowRequested { get { lock (_gate) return _requestInterruptWindow; } }

    /// <summary>Times the actor set RequestInterruptWindow to true.</summary>
    public int InterruptWindowRequests { get { lock (_gate) return _interruptWindowRequests; } }

    /// <summary>The registers as stored (set by the test or by the actor).</summary>
    public KvmRegs Registers
    {
        get { lock (_gate) return _regs; }
        set { lock (_gate) _regs = value; }
    }

    public KvmSregs SpecialRegisters
    {
        get { lock (_gate) return _sregs; }
        set { lock (_gate) _sregs = value; }
    }

    /// <summary>Blocks until <paramref name="condition"/> holds (re-checked on every recorded
    /// change of this vcpu) or the timeout passes; returns whether it holds.</summary>
    public bool WaitUntil(Func<ScriptedVcpu, bool> condition, TimeSpan? timeout = null)
    {
        var deadline = DateTime.UtcNow + (timeout ?? TimeSpan.FromSeconds(3));
        lock (_gate)
        {
            while (true)
            {
                if (condition(this)) return true;
                var left = deadline - DateTime.UtcNow;
                if (left <= TimeSpan.Zero) return false;
                // Bounded wait: a condition may also depend on Pending, which changes without _gate.
                Monitor.Wait(_gate, left < TimeSpan.FromMilliseconds(20) ? left : TimeSpan.FromMilliseconds(20));
            }
        }
    }

    /// <summary>Until the vcpu is back in Run with nothing left to return: it handled the last exit
    /// it took (a Run that has just taken an exit is still "in Run" until it returns).</summary>
    public bool WaitUntilIdleInGuest(TimeSpan? timeout = null) =>
        WaitUntil(v => v.IdleInGuest, timeout);

    // ---- IVcpu (the actor's thread, except Kick) ----

    public VmExit Run()
    {
        Changed(() =>
        {
            _runs++;
            _inRun = true;
            _runThreadName = Thread.CurrentThread.Name;
            if (Environment.CurrentManagedThreadId != _boundThreadId) _runsOffBoundThread++;
        });
        try
        {
            if (_disposed.IsCancellationRequested)
            {
                Thread.Sleep(1); // do not let a still-running actor spin hot after Dispose
                return VmExit.Intr.Instance;
            }
            var which = BlockingCollection<VmExit>.TakeFromAny([_kick, _exits], out var exit, _disposed.Token);
            if (which == 0)
            {
                // immediate_exit is cleared by the VMM after the EINTR exit.
                Volatile.Write(ref _kickPending, 0);
                Changed(() => { _intrReturned++; _takenInRun = _runs; });
            }
            else
            {
                Changed(() => { _consumed++; _untaken--; _takenInRun = _runs; });
            }
            return exit;
        }
        catch (OperationCanceledException)
        {
            return VmExit.Intr.Instance;
        }
        finally
        {
            Changed(() => _inRun = false);
        }
    }

    public void CompleteIoIn(int index, ulong value) => Changed(() => _ioIn.Add((index, value)));

    public void CompleteMmioRead(ulong value) => Changed(() => _mmioReads.Add(value));

    public void CompleteMsrRead(ulong value, bool fault) => Changed(() => _msrReads.Add((value, fault)));

    public void CompleteMsrWrite(bool fault) => Changed(() => _msrWrites.Add(fault));

    public KvmRegs GetRegisters() => Registers;

    public void SetRegisters(in KvmRegs regs)
    {
        var copy = regs;
        Changed(() => _regs = copy);
    }

    public KvmSregs GetSpecialRegisters() => SpecialRegisters;

    public void SetSpecialRegisters(in KvmSregs sregs)
    {
        var copy = sregs;
        Changed(() => _sregs = copy);
    }

    public bool InterruptsEnabled
    {
        get => _interruptsEnabled;
        set => _interruptsEnabled = value;
    }

    public bool ReadyForInterruptInjection
    {
        get => _readyForInjection;
        set => _readyForInjection = value;
    }

    public bool RequestInterruptWindow
    {
        set => Changed(() =>
        {
            _requestInterruptWindow = value;
            if (value) _interruptWindowRequests++;
        });
    }

    private ulong _cr8;

    /// <summary>kvm_run.cr8: a test sets it as the guest's CR8 before supplying an exit; the actor
    /// sets it for the next entry.</summary>
    public ulong Cr8
    {
        get { lock (_gate) return _cr8; }
        set => Changed(() => _cr8 = value);
    }

    public void InjectInterrupt(byte vector) => Changed(() =>
    {
        _injected.Add(vector);
        _injectedAt.Add((vector, _consumed, _intrReturned));
    });

    public void InjectNmi() => Changed(() => _nmis++);

    private readonly List<KvmMsrEntry> _msrsSet = [];

    /// <summary>Every entry the actor gave KVM_SET_MSRS, in order.</summary>
    public KvmMsrEntry[] MsrsSet { get { lock (_gate) return [.. _msrsSet]; } }

    public void SetMsrs(params KvmMsrEntry[] msrs) => Changed(() => _msrsSet.AddRange(msrs));

    /// <summary>Identity: linear = physical.</summary>
    public bool TryTranslate(ulong linearAddress, out GuestPhysAddr physical)
    {
        physical = new GuestPhysAddr(linearAddress);
        return true;
    }

    // ---- dirty ring ----

    private readonly ConcurrentQueue<DirtyRingHarvest> _harvests = new();
    private string? _harvestThreadName;

    /// <summary>Gives the vcpu a dirty ring whose next harvests return these GFNs, in order (then empty).</summary>
    public void SupplyHarvest(params ulong[] gfns) => SupplyHarvest(new DirtyRingHarvest(gfns, false));

    public void SupplyHarvest(DirtyRingHarvest harvest)
    {
        HasDirtyRing = true;
        _harvests.Enqueue(harvest);
    }

    public bool HasDirtyRing { get; private set; }

    /// <summary>The name of the thread that last harvested the ring.</summary>
    public string? HarvestThreadName { get { lock (_gate) return _harvestThreadName; } }

    public DirtyRingHarvest HarvestDirtyRing()
    {
        lock (_gate) _harvestThreadName = Thread.CurrentThread.Name;
        return _harvests.TryDequeue(out var harvest) ? harvest : DirtyRingHarvest.Empty;
    }

    // ---- snapshot ----

    private readonly List<(VcpuKvmState State, string? Thread)> _restores = [];
    private int _saves;

    /// <summary>The MP state the fake reports as KVM's in its saved state (null: no KVM local APIC).</summary>
    public KvmMpState? MpState { get; set; }

    /// <summary>Every state given to <see cref="RestoreState"/>, with the name of the thread it came on.</summary>
    public IReadOnlyList<(VcpuKvmState State, string? Thread)> Restores { get { lock (_gate) return [.. _restores]; } }

    public int Saves { get { lock (_gate) return _saves; } }

    /// <summary>When set, RestoreState throws this (KVM refusing a part).</summary>
    public KvmException? RestoreFailure { get; set; }

    /// <summary>KVM's parts at their struct sizes: the registers as set, the rest filled with a pattern.</summary>
    public VcpuKvmState SaveState()
    {
        lock (_gate)
        {
            _saves++;
            return new VcpuKvmState
            {
                Registers = VcpuKvmState.Image(_regs),
                SpecialRegisters = VcpuKvmState.Image(_sregs),
                Fpu = Pattern(KvmStateSizes.Fpu, 1),
                Xsave = Pattern(KvmStateSizes.Xsave, 2),
                Xcrs = [new XcrValue(0, 0x7)],
                DebugRegisters = Pattern(KvmStateSizes.DebugRegs, 3),
                Msrs = [new MsrValue(SavedMsrs.Tsc, 0x1234_5678_9ABC), new MsrValue(SavedMsrs.Lstar, 0xFFFF_FFFF_8100_0000)],
                Events = new byte[KvmStateSizes.VcpuEvents],
                MpState = MpState,
                Lapic = MpState is null ? null : Pattern(KvmStateSizes.Lapic, 4),
            };
        }
    }

    public void RestoreState(VcpuKvmState state)
    {
        if (RestoreFailure is { } failure) throw failure;
        Changed(() =>
        {
            _restores.Add((state, Thread.CurrentThread.Name));
            _regs = state.GetRegs();
            _sregs = state.GetSregs();
        });
    }

    private static byte[] Pattern(int size, int seed) => [.. Enumerable.Range(0, size).Select(i => (byte)(i * 7 + seed))];

    public void BindToCurrentThread() => Changed(() =>
    {
        _boundThreadName = Thread.CurrentThread.Name;
        _boundThreadId = Environment.CurrentManagedThreadId;
    });

    public void Kick()
    {
        Interlocked.Increment(ref _kicks);
        // Set the flag; only the kick that sets it queues the Intr (kicks coalesce). A kick that
        // finds it already set is covered by the pending Intr, which Run has not returned yet.
        if (Interlocked.Exchange(ref _kickPending, 1) == 0) _kick.Add(VmExit.Intr.Instance);
        Changed(() => { });
    }

    public void Dispose() => _disposed.Cancel();

    private void Changed(Action change)
    {
        lock (_gate)
        {
            change();
            Monitor.PulseAll(_gate);
        }
    }
}
