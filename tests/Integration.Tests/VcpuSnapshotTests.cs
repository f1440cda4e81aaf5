using System.Collections.Concurrent;
using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Serialization;
using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Host;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Config;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Vm;
using ActorVmm.Lapic;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using ActorVmm.Testing;
using ActorVmm.Vcpu;
using Iced.Intel;
using Xunit;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Integration.Tests;

/// <summary>
/// A guest's vcpu and local APIC saved through their actors (<see cref="VcpuProtocol.SaveState"/>,
/// <see cref="VlapicProtocol.GetState"/>), written as JSON and read back, and restored into a NEW
/// KVM VM (new VmHandle, vcpu, vcpu and vlapic actors, a copy of guest memory) in the same process,
/// twice: once while the guest spins on a device read, once while it sleeps in HLT with its local
/// APIC timer armed. The VM is wired here without the VM actor (the vcpu, its vlapic and one test
/// device), as the VM actor will wire a restored VM: <c>VcpuProtocol.Props(..., snapshot)</c> +
/// Start, <c>VlapicProtocol.Props(..., initial)</c>, the VM's kvmclock (<see cref="VmHandle.RestoreClock"/>)
/// and a device clock that continues the saved one's time.
/// </summary>
public sealed class VcpuSnapshotTests
{
    private const ulong Code = 0x10_0000;
    private const ulong Flag = 0x9F900;
    private const long LapicBase = InterruptCode.LapicBase;

    // The test device's ports (offsets from DevicePort): the guest's count, "timer armed", the two
    // halves of R12, R13 (its count register), "done"; a read of Gate is the gate (0 = closed).
    private const ushort DevicePort = 0x10;
    private const int CountOffset = 0, ArmedOffset = 1, MagicOffset = 2, R13Offset = 3, GateOffset = 4, DoneOffset = 5;

    private const uint FirstSteps = 20, Steps = 40;
    private const ulong Magic = 0x5A5A_1234_C0DE_F00D;
    /// <summary>The one-shot LAPIC timer: 2·10⁹ counts at divide-by-1, 2 s at the 1 GHz APIC bus
    /// both APICs count at: long after the save, which follows the guest's HLT within milliseconds.</summary>
    private const uint TimerCount = 2_000_000_000;

    public static TheoryData<LapicMode> LapicModes => new() { LapicMode.Emulated, LapicMode.Assisted };

    /// <summary>The snapshot file's JSON form (the lead's options: camelCase, enums as strings).</summary>
    internal static readonly JsonSerializerOptions Json = new(JsonSerializerDefaults.Web)
    {
        Converters = { new JsonStringEnumConverter() },
    };

    /// <summary>
    /// The guest counts 1..20 on a port, spins on a closed gate (a device read), and is saved there
    /// (VM A). Restored into VM B with the gate open, it counts 21..40 without a gap, arms a 2 s
    /// one-shot LAPIC timer and sleeps (sti; hlt); saved there, halted, with the timer armed. Restored
    /// into VM C, it is woken by that timer and reports the R12 and R13 it had before both saves.
    /// </summary>
    [KvmTheory]
    [MemberData(nameof(LapicModes))]
    public async Task A_guest_saved_while_running_and_while_halted_with_an_armed_timer_goes_on_in_new_vms(LapicMode lapic)
    {
        KvmRequirement.Check();
        var system = HostRunner.CreateSystem(VmConfig.Load(null), "snapshot");
        try
        {
            // VM A: from the image, until it spins at the gate after step 20.
            VcpuSnapshot first;
            LapicState? firstLapic;
            TimeSpan firstClock;
            VmKvmState firstKvmClock;
            byte[] firstMemory;
            await using (var a = await BareVm.StartAsync(system, "a", lapic, Image(), null))
            {
                await a.Device.WaitForAsync(d => d.Values(CountOffset).Count >= FirstSteps, a);
                await Task.Delay(50); // into the gate loop: reads, each a reply the pause must wait for
                (first, firstLapic) = await a.SaveAsync();
                firstClock = a.Clock.Now;
                firstKvmClock = a.Vm.SaveClock();
                firstMemory = a.CopyMemory();
                Assert.Equal(Enumerable.Range(1, (int)FirstSteps).Select(i => (ulong)i), a.Device.Values(CountOffset));
                Assert.Empty(a.Device.Values(ArmedOffset));
            }
            Assert.Equal(VcpuProtocol.State.Running, first.ResumeIn);
            Assert.Equal(lapic == LapicMode.Assisted, first.Kvm.Lapic is not null);
            Assert.Equal(lapic == LapicMode.Emulated, firstLapic is not null);

            // VM B: the gate is open; it counts on from 21, arms its timer and sleeps; saved halted.
            VcpuSnapshot second;
            LapicState? secondLapic;
            TimeSpan secondClock;
            VmKvmState secondKvmClock;
            byte[] secondMemory;
            await using (var b = await BareVm.StartAsync(system, "b", lapic, null,
                             new Restore(RoundTrip(first), RoundTrip(firstLapic), firstClock, firstKvmClock, firstMemory)))
            {
                b.Device.Gate = 1;
                await b.Device.WaitForAsync(d => d.Values(ArmedOffset).Count > 0, b);
                (second, secondLapic) = await b.SaveHaltedAsync(lapic);
                secondClock = b.Clock.Now;
                secondKvmClock = b.Vm.SaveClock();
                secondMemory = b.CopyMemory();
                Assert.Equal(Enumerable.Range((int)FirstSteps + 1, (int)(Steps - FirstSteps)).Select(i => (ulong)i),
                    b.Device.Values(CountOffset));
                Assert.Empty(b.Device.Values(MagicOffset)); // not woken before the save
            }
            if (lapic == LapicMode.Emulated)
            {
                Assert.Equal(VcpuProtocol.State.Halted, second.ResumeIn);
                Assert.True(secondLapic!.TimerArmed, "the emulated APIC's timer must be armed in the saved state");
            }
            else
            {
                Assert.Equal(KvmMpState.Halted, second.Kvm.MpState);
            }

            // VM C: asleep until its timer, restored with it, wakes it; then the guest reports.
            await using var c = await BareVm.StartAsync(system, "c", lapic, null,
                new Restore(RoundTrip(second), RoundTrip(secondLapic), secondClock, secondKvmClock, secondMemory));
            await c.Device.WaitForAsync(d => d.Values(DoneOffset).Count > 0, c, TimeSpan.FromSeconds(60));
            var magic = c.Device.Values(MagicOffset);
            Assert.Equal(2, magic.Count);
            Assert.Equal(Magic, magic[0] | magic[1] << 32);
            Assert.Equal([(ulong)Steps], c.Device.Values(R13Offset));
            Assert.Empty(c.Device.Values(CountOffset)); // nothing counted again
            Assert.Equal([0UL], c.Device.Values(DoneOffset));
        }
        finally
        {
            await system.Terminate();
        }
    }

    private static T RoundTrip<T>(T value) => JsonSerializer.Deserialize<T>(JsonSerializer.Serialize(value, Json), Json)!;

    /// <summary>The guest (64-bit, <see cref="LongModeImage"/>): see the test.</summary>
    private static LongModeImage Image()
    {
        var a = new Assembler(64);
        var handler = a.CreateLabel();
        var count1 = a.CreateLabel();
        var gate = a.CreateLabel();
        var count2 = a.CreateLabel();
        var wait = a.CreateLabel();
        var hlt = a.CreateLabel();
        a.mov(r12, unchecked((long)Magic));
        InterruptCode.SetGate(a, 0x41, handler);
        InterruptCode.EnableLocalApic(a);              // RBX = the APIC page
        a.xor(r13d, r13d);
        a.Label(ref count1);
        a.inc(r13d);
        a.mov(eax, r13d);
        a.@out(DevicePort + CountOffset, eax);
        a.cmp(r13d, FirstSteps);
        a.jb(count1);
        a.Label(ref gate);                               // until the host opens the gate
        a.@in(eax, DevicePort + GateOffset);
        a.test(eax, eax);
        a.jz(gate);
        a.Label(ref count2);
        a.inc(r13d);
        a.mov(eax, r13d);
        a.@out(DevicePort + CountOffset, eax);
        a.cmp(r13d, Steps);
        a.jb(count2);
        a.mov(__dword_ptr[rbx + ApicOffsets.TimerDivide], 0b1011);        // divide by 1
        a.mov(__dword_ptr[rbx + ApicOffsets.LvtTimer], 0x41);             // one-shot, vector 0x41
        a.mov(__dword_ptr[rbx + ApicOffsets.TimerInitialCount], TimerCount);
        a.mov(eax, 1);
        a.@out(DevicePort + ArmedOffset, al);
        a.mov(rdi, (long)Flag);
        a.Label(ref wait);
        InterruptCode.SleepWithInterruptsOn(a, hlt);
        a.cmp(__byte_ptr[rdi], 1);
        a.jne(wait);
        a.mov(rax, r12);
        a.@out(DevicePort + MagicOffset, eax);
        a.shr(rax, 32);
        a.@out(DevicePort + MagicOffset, eax);
        a.mov(eax, r13d);
        a.@out(DevicePort + R13Offset, eax);
        a.mov(al, 0);
        a.@out(DevicePort + DoneOffset, al);
        var end = a.CreateLabel();
        a.Label(ref end);
        a.cli();
        a.hlt();
        a.jmp(end);
        a.Label(ref handler);
        InterruptCode.ReturnPastInterruptedHlt(a, hlt);
        a.push(rdi);
        a.mov(rdi, (long)Flag);
        a.mov(__byte_ptr[rdi], 1);
        a.mov(rdi, LapicBase);
        a.mov(__dword_ptr[rdi + ApicOffsets.Eoi], 0);
        a.pop(rdi);
        a.iretq();
        return new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);
    }

    /// <summary>What a restored VM starts from.</summary>
    private sealed record Restore(VcpuSnapshot Vcpu, LapicState? Lapic, TimeSpan ClockNow, VmKvmState KvmClock, byte[] Memory);

    /// <summary>A device clock that continues from <paramref name="start"/> (MonotonicClock.StartingAt's behaviour).</summary>
    private sealed class ContinuingClock(TimeSpan start) : IDeviceClock
    {
        private readonly long _t0 = Stopwatch.GetTimestamp();
        public TimeSpan Now => start + Stopwatch.GetElapsedTime(_t0);
    }

    /// <summary>The guest's test device: records every write per offset; a read of the gate gives <see cref="Gate"/>.</summary>
    private sealed class Recorder : IBusDevice
    {
        private readonly ConcurrentQueue<(ulong Offset, ulong Value)> _writes = new();
        public volatile int Gate;

        public ulong Read(ulong offset, int size) => offset == GateOffset ? (ulong)Gate : 0;

        public void Write(ulong offset, int size, ulong value) => _writes.Enqueue((offset, value));

        public List<ulong> Values(int offset) => [.. _writes.Where(w => w.Offset == (ulong)offset).Select(w => w.Value)];

        public async Task WaitForAsync(Func<Recorder, bool> condition, BareVm vm, TimeSpan? timeout = null)
        {
            var deadline = DateTime.UtcNow + (timeout ?? TimeSpan.FromSeconds(120));
            while (!condition(this))
            {
                if (DateTime.UtcNow > deadline || vm.Events.Any(e => e is VcpuProtocol.Stopped))
                    throw new Xunit.Sdk.XunitException($"the guest did not get there: writes {string.Join(", ", _writes)}; " +
                                                       $"the VM was told {string.Join("; ", vm.Events)}");
                await Task.Delay(5);
            }
        }
    }

    /// <summary>Stands in for the VM actor: keeps what the vcpu tells it.</summary>
    private sealed class Collector : ReceiveActor
    {
        public Collector(ConcurrentQueue<object> events) => ReceiveAny(events.Enqueue);
    }

    /// <summary>
    /// One vcpu, its vlapic and the test device, wired as the VM actor wires them, on a VM of its
    /// own: from the image, or from a <see cref="Restore"/> (memory copied in, the kvmclock restored,
    /// the vcpu and vlapic actors built with their saved state, then Start).
    /// </summary>
    private sealed class BareVm : IAsyncDisposable
    {
        private const ulong MemoryBytes = 16 << 20;
        private readonly ActorSystem _system;
        private readonly List<IDisposable> _owned = [];
        private readonly List<IActorRef> _actors = [];

        public required Kvm Kvm { get; init; }
        public required VmHandle Vm { get; init; }
        public required GuestMemoryMap Memory { get; init; }
        public required VcpuHandle Handle { get; init; }
        public required IDeviceClock Clock { get; init; }
        public required bool Assisted { get; init; }
        public Recorder Device { get; } = new();
        public ConcurrentQueue<object> Events { get; } = new();
        public IActorRef VcpuActor { get; private set; } = ActorRefs.Nobody;
        public IActorRef? VlapicActor { get; private set; }

        private BareVm(ActorSystem system) => _system = system;

        public static async Task<BareVm> StartAsync(ActorSystem system, string name, LapicMode lapic, BootImage? image, Restore? restore)
        {
            var assisted = lapic == LapicMode.Assisted;
            var memory = VmspaceLayout.Build(MemoryBytes);
            var boot = image?.Load(memory);
            if (restore is not null) WriteMemory(memory, restore.Memory);
            var kvm = Kvm.Open();
            var vm = kvm.CreateVm();
            memory.RegisterWith(vm);
            if (assisted) vm.EnableSplitIrqchip(MsiEncoding.IoApicRoutes);
            else VmBuilder.EmulateApicMsrs(vm);
            var provided = new[] { CpuModel.Feature("x2apic"), CpuModel.Feature("tsc-deadline") };
            var cpuid = CpuidPolicy.ForModel(kvm.GetSupportedCpuid(), CpuModel.Host,
                assisted && kvm.CheckExtension(KvmCap.TscDeadlineTimer) <= 0 ? provided[..1] : provided,
                CpuidPolicy.Hidden(kernelLapic: assisted));
            var handle = vm.CreateVcpu(0, cpuid);
            if (!assisted)
            {
                try { handle.SetMsrs(new KvmMsrEntry { Index = ApicMsrs.ApicBase, Data = LocalApic.ResetBase(bsp: true) }); }
                catch (KvmException) { }
            }
            boot?.ApplyTo(handle);
            // The VM-wide state first, then the vcpu's (VcpuHandle.RestoreState).
            if (restore is not null) vm.RestoreClock(restore.KvmClock, bringWallClockToNow: true);
            var clock = new ContinuingClock(restore?.ClockNow ?? TimeSpan.Zero);
            var run = new BareVm(system) { Kvm = kvm, Vm = vm, Memory = memory, Handle = handle, Clock = clock, Assisted = assisted };
            run._owned.AddRange([handle, memory, vm, kvm]);
            run.Wire(name, assisted, cpuid, restore);
            // Every vcpu of a restored VM is sent Start; a vcpu with a snapshot answers Restored.
            if (restore is null) run.VcpuActor.Tell(VcpuProtocol.Start.Instance);
            else
            {
                var answer = await run.VcpuActor.Ask<object>(VcpuProtocol.Start.Instance, TimeSpan.FromSeconds(30));
                Assert.Equal(new VcpuProtocol.Restored(0, restore.Vcpu.ResumeIn), answer);
            }
            return run;
        }

        private void Wire(string name, bool assisted, CpuidPolicy cpuid, Restore? restore)
        {
            var vmActor = _system.ActorOf(Props.Create(() => new Collector(Events)), $"{name}-vm");
            _actors.Add(vmActor);
            var device = _system.ActorOf(DeviceProtocol.Props("recorder", _ => Device, vmActor)
                .WithDispatcher(DeviceProtocol.DispatcherId), $"{name}-recorder");
            _actors.Add(device);
            var backend = assisted
                ? LapicBackends.KvmAssisted(new KvmApicBus(Vm))
                : LapicBackends.Emulated(VmBuilder.EmulatedLapicOptions(Handle, Clock, cpuid));
            var vlapic = _system.ActorOf(VlapicProtocol.Props(0, new VlapicProtocol.Wiring(ActorRefs.Nobody, ActorRefs.Nobody, ActorRefs.Nobody),
                backend, Clock, restore?.Lapic).WithDispatcher(VcpuProtocol.VlapicDispatcherId), $"{name}-vlapic");
            _actors.Add(vlapic);
            VlapicActor = vlapic;
            var ports = AddressBus<DeviceRoute>.Empty.Insert(new DeviceRoute("recorder", device), DevicePort, 8);
            var apicPage = assisted ? null : new DeviceRoute("vlapic-0", vlapic, waitForWriteAt: o => o == VlapicProtocol.TprOffset);
            var wiring = new VcpuProtocol.Wiring(ports, AddressBus<DeviceRoute>.Empty, vmActor, Memory, vlapic, null, assisted,
                ApicPage: apicPage);
            VcpuActor = _system.ActorOf(VcpuProtocol.Props(Handle, wiring, restore?.Vcpu), $"{name}-vcpu-0");
            _actors.Insert(0, VcpuActor);
            vlapic.Tell(new VlapicProtocol.AttachVcpu(VcpuActor));
        }

        /// <summary>Pauses the vcpu and saves it and its emulated APIC (null with KVM's APIC, which is in the vcpu's state).</summary>
        public async Task<(VcpuSnapshot Vcpu, LapicState? Lapic)> SaveAsync()
        {
            await VcpuActor.Ask<VcpuProtocol.Paused>(VcpuProtocol.Pause.Instance, TimeSpan.FromSeconds(30));
            var saved = await VcpuActor.Ask<object>(VcpuProtocol.SaveState.Instance, TimeSpan.FromSeconds(30));
            var snapshot = Assert.IsType<VcpuProtocol.SavedState>(saved).Snapshot;
            LapicState? lapic = null;
            if (!Assisted)
                lapic = (await VlapicActor!.Ask<VlapicProtocol.StateReply>(VlapicProtocol.GetState.Instance, TimeSpan.FromSeconds(30))).State;
            return (snapshot, lapic);
        }

        /// <summary>Saves the vcpu once it sleeps in HLT (the guest reaches it within milliseconds of its
        /// "armed" write): a save that finds it still on the way resumes it and tries again.</summary>
        public async Task<(VcpuSnapshot Vcpu, LapicState? Lapic)> SaveHaltedAsync(LapicMode lapic)
        {
            for (var attempt = 0; ; attempt++)
            {
                var saved = await SaveAsync();
                var halted = lapic == LapicMode.Emulated
                    ? saved.Vcpu.ResumeIn == VcpuProtocol.State.Halted
                    : saved.Vcpu.Kvm.MpState == KvmMpState.Halted;
                if (halted || attempt == 100) return saved;
                await VcpuActor.Ask<VcpuProtocol.Resumed>(VcpuProtocol.Resume.Instance, TimeSpan.FromSeconds(30));
                await Task.Delay(20);
            }
        }

        /// <summary>Guest RAM, every writable range in address order.</summary>
        public byte[] CopyMemory()
        {
            var ranges = Memory.Ranges.Where(r => !r.ReadOnly).OrderBy(r => r.Base.Value).ToArray();
            var bytes = new byte[ranges.Sum(r => (long)r.Size)];
            var at = 0L;
            foreach (var r in ranges)
            {
                Memory.Read(r.Base, bytes.AsSpan((int)at, (int)r.Size));
                at += (long)r.Size;
            }
            return bytes;
        }

        private static void WriteMemory(GuestMemoryMap memory, byte[] bytes)
        {
            var at = 0L;
            foreach (var r in memory.Ranges.Where(r => !r.ReadOnly).OrderBy(r => r.Base.Value))
            {
                memory.Write(r.Base, bytes.AsSpan((int)at, (int)r.Size));
                at += (long)r.Size;
            }
            Assert.Equal(bytes.Length, at);
        }

        public async ValueTask DisposeAsync()
        {
            // The vcpu leaves the guest for good before its KVM vcpu goes.
            try { await VcpuActor.Ask<VcpuProtocol.Stopped>(VcpuProtocol.Stop.Instance, TimeSpan.FromSeconds(30)); }
            catch (Exception) { /* stopped already */ }
            foreach (var actor in _actors) await actor.GracefulStop(TimeSpan.FromSeconds(10));
            foreach (var d in _owned) d.Dispose();
        }
    }
}
