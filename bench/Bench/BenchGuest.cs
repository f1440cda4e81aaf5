using System.Diagnostics;
using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Host;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Config;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Vm;
using ActorVmm.LibVmm;
using ActorVmm.Lapic;
using ActorVmm.Memory;
using ActorVmm.Vcpu;
using Iced.Intel;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Bench;

/// <summary>
/// What the guest benchmarks share: 64-bit guests assembled at <see cref="Code"/> that mark the
/// measured part with writes to <see cref="MarkPort"/> and end through the debug-exit port, and
/// running such a guest under ActorVmm with a <see cref="Marks"/> device on that port.
/// </summary>
internal static class BenchGuest
{
    public const ulong Code = 0x10_0000;
    public const byte MarkPort = 0x10;
    public const ushort DebugExitPort = 0xF4;

    /// <summary>False, having said why on stderr, when there is no usable /dev/kvm.</summary>
    public static bool KvmAvailable()
    {
        if (Kvm.Unavailability() is not { } why) return true;
        Console.Error.WriteLine($"actorvmm-bench: KVM unavailable: {why}");
        return false;
    }

    public static LongModeImage Long(Action<Assembler> body)
    {
        var a = new Assembler(64);
        body(a);
        return new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);
    }

    /// <summary>Guest code: write <paramref name="which"/> to the marker port. Clobbers al.</summary>
    public static void Mark(Assembler a, byte which)
    {
        a.mov(al, which);
        a.@out(MarkPort, al);
    }

    /// <summary>Guest code: debug-exit with status 0 (the VM's exit code 1).</summary>
    public static void ExitOk(Assembler a)
    {
        a.mov(al, 0);
        a.@out((byte)DebugExitPort, al);
    }

    /// <summary>Runs <paramref name="spec"/>'s guest under ActorVmm with a <see cref="Marks"/> device
    /// on the marker port until it debug-exits with status 0; then, before the VM is torn down,
    /// <paramref name="after"/> may ask its actors.</summary>
    public static async Task<(Marks Marks, T After)> RunAsync<T>(VmSpec spec, Func<ActorSystem, RunningVm, Task<T>> after,
        Akka.Configuration.Config? config = null, Func<RunningVm, string>? guestState = null)
    {
        var system = HostRunner.CreateSystem(config ?? VmConfig.Load(null), "bench");
        try
        {
            using var console = SerialConsole.Captured();
            var marks = new Marks();
            var builder = new VmBuilder(system, spec)
                .WithStandardDevices(console)
                .AddDevice(new DeviceSpec("mark", DeviceProtocol.Space.Port, MarkPort, 1, _ => marks));
            await using var vm = builder.Start();
            var outcome = await WaitReporting(system, vm, spec, TimeSpan.FromMinutes(10), guestState);
            if (outcome is not { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 })
                throw new InvalidOperationException($"{spec.Name} guest ended: {outcome}");
            return (marks, await after(system, vm));
        }
        finally
        {
            await system.Terminate();
        }
    }

    /// <summary>Waits for the guest to end (at most <paramref name="limit"/>); while it runs for
    /// longer than a bench guest should, says every minute what its vcpus and vlapics are doing,
    /// and what <paramref name="guestState"/> reads of the guest's own state.</summary>
    private static async Task<VmProtocol.Outcome> WaitReporting(ActorSystem system, RunningVm vm, VmSpec spec, TimeSpan limit,
        Func<RunningVm, string>? guestState)
    {
        var until = DateTime.UtcNow + limit;
        while (true)
        {
            var left = until - DateTime.UtcNow;
            var slice = left < TimeSpan.FromMinutes(1) ? left : TimeSpan.FromMinutes(1);
            if (await Task.WhenAny(vm.Ended, Task.Delay(slice > TimeSpan.Zero ? slice : TimeSpan.Zero)) == vm.Ended || left <= slice)
                return await vm.WaitAsync(TimeSpan.FromSeconds(1));
            Console.Error.WriteLine($"bench: {spec.Name} still running after {(limit - (until - DateTime.UtcNow)).TotalSeconds:F0} s:");
            if (guestState is not null)
            {
                try { Console.Error.WriteLine($"  {guestState(vm)}"); }
                catch (Exception e) when (e is GuestMemoryException or ArgumentException) { Console.Error.WriteLine($"  guest state not read: {e.Message}"); }
            }
            for (var i = 0; i < spec.Cpus; i++)
            {
                try
                {
                    var v = await system.ActorSelection(vm.Actor.Path / $"vcpu-{i}").Ask<VcpuProtocol.Stats>(VcpuProtocol.GetStats.Instance, TimeSpan.FromSeconds(5));
                    Console.Error.WriteLine($"  vcpu {i}: {v.State}, {v.Exits} exits ({v.IoExits} io, {v.MmioExits} mmio, {v.HltExits} hlt, {v.IntrExits} intr), {v.Injected} injected");
                }
                catch (Exception e) { Console.Error.WriteLine($"  vcpu {i}: no answer ({e.GetType().Name})"); }
                try
                {
                    var l = await system.ActorSelection(vm.Actor.Path / $"vlapic-{i}").Ask<VlapicProtocol.Stats>(VlapicProtocol.GetStats.Instance, TimeSpan.FromSeconds(5));
                    Console.Error.WriteLine($"  vlapic {i}: {l.IpisSent} IPIs sent, {l.Delivered} delivered, {l.Accepted} accepted, {l.TimerCallbacks} timer callbacks");
                }
                catch (Exception e) { Console.Error.WriteLine($"  vlapic {i}: no answer ({e.GetType().Name})"); }
                // Where the guest is and what its APIC holds (KVM's own APIC under lapic = assisted):
                // tells a lost IPI (nothing in IRR) from one never taken (in IRR, IF or PPR in the way).
                try
                {
                    var r = await system.ActorSelection(vm.Actor.Path / $"vcpu-{i}").Ask<VcpuProtocol.Registers>(VcpuProtocol.GetRegisters.Instance, TimeSpan.FromSeconds(5));
                    Console.Error.WriteLine($"  vcpu {i}: RIP={r.General.Rip:X} RFLAGS={r.General.Rflags:X} (IF={(r.General.Rflags >> 9) & 1}) CS={r.Special.Cs.Selector:X4} R12={r.General.R12:X}");
                    var l = await system.ActorSelection(vm.Actor.Path / $"vlapic-{i}").Ask<object>(VlapicProtocol.GetState.Instance, TimeSpan.FromSeconds(5));
                    Console.Error.Write(l is VlapicProtocol.StateReply state ? LapicDump.Format(i, state.State) : $"  vlapic {i}: state not read ({l.GetType().Name})\n");
                }
                catch (Exception e) { Console.Error.WriteLine($"  vcpu {i}: registers or APIC state not read ({e.GetType().Name}: {e.Message})"); }
            }
        }
    }

    public static async Task<Marks> RunAsync(VmSpec spec) =>
        (await RunAsync(spec, (_, _) => Task.FromResult(0))).Marks;
}

/// <summary>
/// The marker device: takes the time of each byte value written to it (the guest's marks), as the
/// device actor handles the write under ActorVmm or as the raw loop handles the exit.
/// </summary>
internal sealed class Marks : IBusDevice
{
    private readonly long[] _at = new long[256];

    public ulong Read(ulong offset, int size) => 0;

    public void Write(ulong offset, int size, ulong value) => _at[(byte)value] = Stopwatch.GetTimestamp();

    /// <summary>Milliseconds from mark <paramref name="from"/> to mark <paramref name="to"/>; throws if the guest made either not.</summary>
    public double Milliseconds(byte from, byte to)
    {
        if (_at[from] == 0 || _at[to] == 0) throw new InvalidOperationException($"the guest never marked {(_at[from] == 0 ? from : to)}");
        return Stopwatch.GetElapsedTime(_at[from], _at[to]).TotalMilliseconds;
    }
}

/// <summary>
/// A VM built with LibVmm only, no actors (the limit the benchmarks compare against): guest RAM
/// from <see cref="VmspaceLayout.Build"/> registered as memslots, the image loaded, its vcpus
/// created (vcpu 0 in its boot state). <see cref="Run"/> is the plain KVM_RUN loop of one vcpu;
/// <see cref="BareApicLoop"/> runs several with user-space local APICs.
/// </summary>
internal sealed class RawVm : IDisposable
{
    private readonly Kvm _kvm;
    private readonly VmHandle _vm;
    private readonly GuestMemoryMap _memory;
    private readonly List<VcpuHandle> _vcpus = [];
    private VcpuHandle Bsp => _vcpus[0];

    public GuestMemoryMap Memory => _memory;
    public IReadOnlyList<VcpuHandle> Vcpus => _vcpus;
    /// <summary>The CPUID its vcpus see: that of a VM of the default CPU model, with a user-space local
    /// APIC's x2APIC and TSC-deadline modes when <c>userSpaceApic</c> (as under lapic = emulated).</summary>
    public CpuidPolicy Cpuid { get; } = null!;

    /// <param name="userSpaceApic">the local APIC's MSRs exit to user space, as under lapic = emulated
    /// (for <see cref="BareApicLoop"/>); there is never an in-kernel APIC</param>
    public RawVm(BootImage image, ulong ramBytes, int cpus = 1, bool userSpaceApic = false)
    {
        _kvm = Kvm.Open();
        try
        {
            _vm = _kvm.CreateVm();
            _memory = VmspaceLayout.Build(ramBytes);
            _memory.RegisterWith(_vm);
            var boot = image.Load(_memory);
            if (userSpaceApic) VmBuilder.EmulateApicMsrs(_vm);
            Cpuid = CpuidPolicy.ForModel(_kvm.GetSupportedCpuid(), CpuModel.Host,
                userSpaceApic ? [CpuModel.Feature("x2apic"), CpuModel.Feature("tsc-deadline")] : null);
            for (var i = 0; i < cpus; i++) _vcpus.Add(_vm.CreateVcpu(i, Cpuid));
            boot.ApplyTo(Bsp);
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    /// <summary>
    /// Runs the vcpu on the calling thread until <paramref name="onIo"/> returns false for a port
    /// I/O exit (an IN's data is whatever it left in the run page) or the guest halts. Any other
    /// exit but a signal's throws.
    /// </summary>
    public void Run(Func<KvmRunView, bool> onIo)
    {
        Bsp.BindToCurrentThread();
        while (true)
        {
            var reason = Bsp.RunRaw();
            if (reason == KvmExitReason.Io)
            {
                if (onIo(Bsp.RunPage)) continue;
                return;
            }
            if (reason == KvmExitReason.Hlt) return;
            if (reason != KvmExitReason.Intr) throw new InvalidOperationException($"unexpected exit {reason}");
        }
    }

    public void Dispose()
    {
        // Partly built: what exists is disposed; fields not yet set are null.
        foreach (var v in _vcpus) v.Dispose();
        _memory?.Dispose();
        _vm?.Dispose();
        _kvm.Dispose();
    }
}
