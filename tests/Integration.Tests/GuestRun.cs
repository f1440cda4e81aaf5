using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Devices.Tracing;
using ActorVmm.Host;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Config;
using ActorVmm.Host.Tracing;
using ActorVmm.Host.Vm;
using ActorVmm.Testing;

namespace ActorVmm.Integration.Tests;

/// <summary>
/// Runs one small guest on real KVM with the standard devices (+ extra ones) and collects what it
/// did: its outcome, its serial output, its memory (readable until disposal) and its trace.
/// </summary>
public sealed class GuestRun : IAsyncDisposable
{
    /// <summary>A guest that has not ended by then is stopped. Generous: these guests end in
    /// milliseconds on kvm_pvm, but CI's KVM box emulates every instruction of the host too, and
    /// runs test classes side by side.</summary>
    public static readonly TimeSpan DefaultTimeout = TimeSpan.FromMinutes(3);

    private readonly ActorSystem _system;
    private readonly SerialConsole _console;

    public RunningVm Vm { get; }
    public ActorSystem System => _system;
    public VmProtocol.Outcome Outcome { get; private set; } = null!;
    public TraceRecorder Trace { get; }
    public string Serial => _console.CapturedText();

    private GuestRun(ActorSystem system, SerialConsole console, RunningVm vm, TraceRecorder trace)
    {
        _system = system;
        _console = console;
        Vm = vm;
        Trace = trace;
    }

    public static Task<GuestRun> RunAsync(BootImage boot, ulong memory = 16 << 20, int cpus = 1,
        TimeSpan? timeout = null, params DeviceSpec[] devices) => RunAsync(boot, memory, cpus, timeout, null, devices);

    public static Task<GuestRun> RunAsync(BootImage boot, ulong memory, int cpus, TimeSpan? timeout,
        ActorVmm.Memory.VmspaceOptions? paging, params DeviceSpec[] devices) =>
        RunAsync(boot, memory, cpus, timeout, paging, LapicMode.Emulated, devices);

    /// <summary>Runs a guest with the local APICs of <paramref name="lapic"/> (emulated or KVM-assisted).</summary>
    public static async Task<GuestRun> RunAsync(BootImage boot, ulong memory, int cpus, TimeSpan? timeout,
        ActorVmm.Memory.VmspaceOptions? paging, LapicMode lapic, params DeviceSpec[] devices)
    {
        var run = await StartAsync(boot, memory, cpus, paging, lapic, null, devices);
        await run.WaitAsync(timeout ?? DefaultTimeout);
        return run;
    }

    /// <summary>
    /// Starts a guest and returns while it runs (with the test library's fault injection:
    /// <see cref="CrashAsync"/>, <see cref="StallStartedAsync"/>, <see cref="FailNestedPageFaultsAsync"/>,
    /// and link faults given here); <see cref="WaitAsync"/> gets its outcome. Returns once the VM's
    /// actors exist.
    /// </summary>
    public static Task<GuestRun> StartAsync(BootImage boot, ulong memory = 16 << 20, int cpus = 1,
        ActorVmm.Memory.VmspaceOptions? paging = null, LapicMode lapic = LapicMode.Emulated, LinkFaultPlan? linkFaults = null,
        params DeviceSpec[] devices) =>
        StartAsync(new VmSpec("guest", memory, cpus, boot, Lapic: lapic, Paging: paging), linkFaults, devices);

    /// <summary>Starts a guest built from <paramref name="spec"/> and returns while it runs.</summary>
    public static Task<GuestRun> StartAsync(VmSpec spec, params DeviceSpec[] devices) => StartAsync(spec, null, devices);

    private static async Task<GuestRun> StartAsync(VmSpec spec, LinkFaultPlan? linkFaults, DeviceSpec[] devices)
    {
        KvmRequirement.Check();
        var system = HostRunner.CreateSystem(VmConfig.Load(null), "test");
        var console = SerialConsole.Captured();
        var trace = new TraceRecorder();
        var builder = new VmBuilder(system, spec).WithStandardDevices(console).WithTrace(trace);
        if (linkFaults is not null) builder.WithLinkFaults(linkFaults);
        foreach (var d in devices) builder.AddDevice(d);
        RunningVm vm;
        try
        {
            vm = builder.Start();
            await vm.Actor.Ask<VmProtocol.Status>(VmProtocol.GetStatus.Instance, TimeSpan.FromSeconds(30)); // its children exist now
        }
        catch
        {
            console.Dispose();
            await system.Terminate();
            throw;
        }
        return new GuestRun(system, console, vm, trace);
    }

    /// <summary>Waits for the guest to end (stopping it after the timeout) and records its outcome.</summary>
    public Task<VmProtocol.Outcome> EndAsync(TimeSpan? timeout = null) => WaitAsync(timeout);

    /// <summary>Asks one of the VM's actors and waits for the answer.</summary>
    public async Task<T> AskChild<T>(string name, object message)
    {
        var actor = await ResolveChild(name);
        return await actor.Ask<T>(message, TimeSpan.FromSeconds(30));
    }

    /// <summary>Waits for the guest to end (stopping it after <paramref name="timeout"/>); sets <see cref="Outcome"/>.</summary>
    public async Task<VmProtocol.Outcome> WaitAsync(TimeSpan? timeout = null)
    {
        Outcome = await Vm.WaitAsync(timeout ?? DefaultTimeout);
        _console.Flush();
        return Outcome;
    }

    /// <summary>Bytes the guest wrote to COM1 so far.</summary>
    public long SerialBytes => _console.BytesWritten;
    public byte[] SerialBytesWritten => _console.CapturedBytes();

    /// <summary>Waits until the guest wrote at least <paramref name="bytes"/> to COM1; false if it
    /// ended or <paramref name="timeout"/> passed first.</summary>
    public async Task<bool> WaitForSerialAsync(long bytes, TimeSpan? timeout = null)
    {
        var deadline = DateTime.UtcNow + (timeout ?? TimeSpan.FromMinutes(2));
        while (_console.BytesWritten < bytes && !Vm.Ended.IsCompleted && DateTime.UtcNow < deadline) await Task.Delay(5);
        return _console.BytesWritten >= bytes;
    }

    public Task CrashAsync(string path, string reason = "test") => VmFaults.CrashAsync(_system, Vm.Actor, path, reason);

    /// <summary>Stalls one of the VM's actors; returns once its thread is inside the stall, with
    /// when it stopped and the task that ends with it. (The actor is resolved first: resolving
    /// kicks a vcpu too.)</summary>
    public async Task<(FaultProtocol.StallStarted Started, Task<string> Ended)> StallStartedAsync(string path, TimeSpan duration,
        string reason = "test") =>
        await VmFaults.StallStartedAsync(_system, await ResolveChild(path), duration, reason);

    public Task<string> FailNestedPageFaultsAsync(int count, ulong? gpa = null, string reason = "test") =>
        VmFaults.FailNestedPageFaultsAsync(_system, Vm.Actor, count, gpa, reason);

    public Task<VmProtocol.Status> StatusAsync() => Vm.Actor.Ask<VmProtocol.Status>(VmProtocol.GetStatus.Instance, TimeSpan.FromSeconds(10));

    /// <summary>One of the VM's actors (the VM actor stays alive until disposal).</summary>
    public Task<IActorRef> ResolveChild(string name) =>
        _system.ActorSelection(Vm.Actor.Path / name).ResolveOne(TimeSpan.FromSeconds(5));

    public async ValueTask DisposeAsync()
    {
        await Vm.DisposeAsync();
        _console.Dispose();
        await _system.Terminate();
    }
}

/// <summary>A test device that counts writes and remembers the last value.</summary>
public sealed class CountingDevice : IBusDevice
{
    private long _writes;
    private long _sum;
    public long Writes => Interlocked.Read(ref _writes);
    public long Sum => Interlocked.Read(ref _sum);
    public ulong Read(ulong offset, int size) => (ulong)Writes;
    public void Write(ulong offset, int size, ulong value)
    {
        Interlocked.Increment(ref _writes);
        Interlocked.Add(ref _sum, (long)value);
    }
}

/// <summary>A test device whose reads return base + n for the n-th read, and that stores writes
/// per offset (a register file), so a guest can read back what it wrote.</summary>
public sealed class RegisterDevice(ulong readBase) : IBusDevice
{
    private readonly Dictionary<ulong, ulong> _registers = new();
    private ulong _reads;
    public IReadOnlyDictionary<ulong, ulong> Registers { get { lock (_registers) return new Dictionary<ulong, ulong>(_registers); } }

    public ulong Read(ulong offset, int size)
    {
        lock (_registers)
            return _registers.TryGetValue(offset, out var v) ? v : readBase + _reads++;
    }

    public void Write(ulong offset, int size, ulong value)
    {
        lock (_registers) _registers[offset] = value;
    }
}

/// <summary>
/// A test device through which a guest and the test take turns: an OUT of n says "I reached step
/// n" (the test awaits it with <see cref="ReachedAsync"/>); an IN reads the last step the test
/// released with <see cref="Release"/>, so a guest spins on IN until the test lets it go on.
/// </summary>
public sealed class HostGate : IBusDevice
{
    /// <summary>A port no device of the platform uses, for a 4-byte gate (<see cref="Device"/>).</summary>
    public const ushort Port = 0x700;

    /// <summary>This gate as a 4-byte device at <paramref name="port"/>.</summary>
    public DeviceSpec Device(ushort port = Port) => new("gate", DeviceProtocol.Space.Port, port, 4, _ => this);

    /// <summary>Guest code: tell the host "step <paramref name="step"/> reached" (a 32-bit OUT to
    /// <paramref name="port"/>) and spin on IN until the host released that step. Clobbers EAX, EDX.</summary>
    public static void SignalAndWait(Iced.Intel.Assembler a, uint step, ushort port = Port)
    {
        var wait = a.CreateLabel();
        a.mov(Iced.Intel.AssemblerRegisters.eax, step);
        a.mov(Iced.Intel.AssemblerRegisters.dx, port);
        a.@out(Iced.Intel.AssemblerRegisters.dx, Iced.Intel.AssemblerRegisters.eax);
        a.Label(ref wait);
        a.@in(Iced.Intel.AssemblerRegisters.eax, Iced.Intel.AssemblerRegisters.dx);
        a.cmp(Iced.Intel.AssemblerRegisters.eax, step);
        a.jb(wait);
    }

    private readonly object _gate = new();
    private readonly Dictionary<ulong, TaskCompletionSource> _reached = new();
    private ulong _released;

    public ulong Read(ulong offset, int size)
    {
        lock (_gate) return _released;
    }

    public void Write(ulong offset, int size, ulong value)
    {
        lock (_gate) Step(value).TrySetResult();
    }

    public void Release(ulong step)
    {
        lock (_gate) _released = step;
    }

    /// <summary>Completes when the guest wrote <paramref name="step"/>, or throws if the VM ended first.</summary>
    public async Task ReachedAsync(ulong step, GuestRun run, TimeSpan? timeout = null)
    {
        Task reached;
        lock (_gate) reached = Step(step).Task;
        var first = await Task.WhenAny(reached, run.Vm.Ended).WaitAsync(timeout ?? TimeSpan.FromSeconds(120));
        if (first != reached) throw new InvalidOperationException($"the guest ended before step {step}: {await run.Vm.Ended}");
    }

    private TaskCompletionSource Step(ulong step)
    {
        if (!_reached.TryGetValue(step, out var tcs))
            _reached[step] = tcs = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        return tcs;
    }
}

/// <summary>
/// Limits of CI's KVM box (kvm_amd nested in QEMU's emulated SVM, see docs/kvm-hosts.md), with the
/// evidence: the reasons of the box-only skips (<c>KvmData.NotInKvmBox</c>). Each test runs on every
/// real KVM.
/// </summary>
internal static class BoxLimits
{
    public const string NmiIpiFromKvmApic = "an NMI IPI from KVM's local APIC never reaches a guest of kvm_amd nested in QEMU's emulated SVM, and QEMU then aborts (tcg_handle_interrupt assertion), taking the box down (seen; the test passes on kvm_pvm)";

    public const string KvmLapicTimerForLinux = "KVM's own local APIC timer stops firing for a Linux guest nested in the box: with the TSC-deadline timer the kernel stalls after 'x86/mm: Memory block size' (2 vcpus), without it after 'x2apic enabled', both for minutes; with noapictimer and no TSC-deadline timer (the PIT in charge) it stalled after 'smpboot: CPU0' (seen here, 2026-12; QEMU as the VMM in the box stalls the same way with KVM's APIC timer, per the issue that asked for Linux). Under lapic = emulated the same kernel boots in the box";

    public const string Cr8WithInterruptWindow = "QEMU's emulated SVM aborts (tcg_handle_interrupt assertion: its CR8 write helper raises the virtual interrupt without holding its lock) when a nested guest writes CR8 while KVM asks for an interrupt window, taking the box down (seen with QEMU 7.2 and 10.0; the test passes on kvm_pvm)";
}
