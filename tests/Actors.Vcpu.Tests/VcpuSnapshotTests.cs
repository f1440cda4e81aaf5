using System.Text.Json;
using System.Text.Json.Serialization;
using Akka.Actor;
using Akka.TestKit;
using Akka.TestKit.Xunit2;
using ActorVmm.Devices;
using ActorVmm.Lapic;
using ActorVmm.LibVmm;
using Xunit.Abstractions;
using static ActorVmm.Vcpu.VcpuProtocol;

namespace ActorVmm.Vcpu.Tests;

/// <summary>
/// Pausing at an instruction boundary, <see cref="SaveState"/> of a paused vcpu, and a vcpu built
/// with a <see cref="VcpuSnapshot"/> (restored at Start on its own thread), driven by a
/// <see cref="ScriptedVcpu"/> with probes for a device ("uart", ports 0x3F8-0x3FF), the vlapic and the VM.
/// </summary>
public sealed class VcpuSnapshotTests : TestKit
{
    private const ushort UartBase = 0x3F8;
    private const ulong RflagsIf = 1UL << 9;
    private static readonly TimeSpan Quiet = TimeSpan.FromMilliseconds(200);

    /// <summary>The snapshot file's options: camelCase, enums as strings.</summary>
    private static readonly JsonSerializerOptions Json = new(JsonSerializerDefaults.Web) { Converters = { new JsonStringEnumConverter() } };

    private readonly List<(IActorRef Actor, ScriptedVcpu Fake)> _started = [];

    static VcpuSnapshotTests()
    {
        ThreadPool.GetMinThreads(out var workers, out var io);
        ThreadPool.SetMinThreads(Math.Max(workers, 32), io);
    }

    public VcpuSnapshotTests(ITestOutputHelper output) : base(VcpuProtocol.DefaultConfig, output)
    {
    }

    private sealed record Rig(ScriptedVcpu Fake, IActorRef Vcpu, TestProbe Uart, TestProbe Vlapic, TestProbe Vm);

    private Rig Create(int id = 0, bool start = true, VcpuSnapshot? restore = null, ScriptedVcpu? fake = null)
    {
        fake ??= new ScriptedVcpu(id);
        var uart = CreateTestProbe();
        var vlapic = CreateTestProbe();
        var vm = CreateTestProbe();
        var wiring = new Wiring(AddressBus<DeviceRoute>.Empty.Insert(new DeviceRoute("uart", uart.Ref), UartBase, 8),
            AddressBus<DeviceRoute>.Empty, vm.Ref, null, vlapic.Ref);
        // The pinned dispatcher: the vcpu's own thread, named vcpu-N.
        var actor = Sys.ActorOf(VcpuProtocol.Props(fake, wiring, restore), $"vcpu-{id}");
        _started.Add((actor, fake));
        if (start)
        {
            actor.Tell(Start.Instance);
            Assert.True(fake.WaitUntilIdleInGuest(), "the vcpu did not enter the guest after Start");
        }
        return new Rig(fake, actor, uart, vlapic, vm);
    }

    protected override void Dispose(bool disposing)
    {
        foreach (var (actor, fake) in _started)
        {
            actor.Tell(Stop.Instance, ActorRefs.NoSender);
            fake.Dispose();
        }
        base.Dispose(disposing);
    }

    private static VmExit.Io Out(ushort port, ulong value) => new(true, port, 1, 1, value, null);

    /// <summary>A snapshot as a vcpu with these registers would give it.</summary>
    private static VcpuSnapshot Snapshot(int id, State resumeIn, PendingInterruptsState? interrupts = null, ulong rflags = 0x2 | RflagsIf,
        KvmMpState? mp = null)
    {
        var source = new ScriptedVcpu(id) { Registers = new KvmRegs { Rip = 0x1234, Rflags = rflags, Rbx = 0xB0B }, MpState = mp };
        var sregs = source.SpecialRegisters;
        sregs.Cr8 = 0x3;
        sregs.ApicBase = 0xFEE0_0900;
        source.SpecialRegisters = sregs;
        return new VcpuSnapshot(id, source.SaveState(), resumeIn, interrupts ?? PendingInterruptsState.None);
    }

    // ---- the snapshot record ----

    [Fact]
    public void Snapshot_must_round_trip_through_json_with_its_states_as_strings()
    {
        var snapshot = Snapshot(1, State.Halted, new PendingInterruptsState([0x30, 0x31], 1, true, true, 5, 42), mp: KvmMpState.Halted)
            with { WakePending = true };

        var json = JsonSerializer.Serialize(snapshot, Json);
        var back = JsonSerializer.Deserialize<VcpuSnapshot>(json, Json)!;

        Assert.Contains("\"resumeIn\":\"Halted\"", json);
        Assert.Contains("\"mpState\":\"Halted\"", json);
        Assert.Equal(snapshot, back);
        Assert.Equal(snapshot.Kvm.GetRegs().Rip, back.Kvm.GetRegs().Rip);
        Assert.Equal(0xFFFF_FFFF_8100_0000UL, back.Kvm.Msr(SavedMsrs.Lstar));
        back.Validate(1);
    }

    [Fact]
    public void Snapshot_must_refuse_a_state_no_vcpu_resumes_in_another_vcpus_state_and_truncated_kvm_parts()
    {
        Assert.Contains("Paused", Assert.Throws<ArgumentException>(() => Snapshot(0, State.Paused).Validate(0)).Message);
        Assert.Contains("vcpu 1", Assert.Throws<ArgumentException>(() => Snapshot(1, State.Running).Validate(0)).Message);
        var truncated = Snapshot(0, State.Running);
        truncated = truncated with { Kvm = truncated.Kvm with { Fpu = new byte[10] } };
        Assert.Contains("Fpu", Assert.Throws<ArgumentException>(() => truncated.Validate(0)).Message);
        var nmis = Snapshot(0, State.Running, PendingInterruptsState.None with { Nmis = 3 });
        Assert.Contains("NMI", Assert.Throws<ArgumentException>(() => nmis.Validate(0)).Message);
    }

    // ---- pause at an instruction boundary ----

    [Fact]
    public async Task Vcpu_must_pause_only_once_the_credit_it_waits_for_is_in()
    {
        var rig = Create();
        for (var i = 0; i < DeviceProtocol.WriteWindow + 1; i++) rig.Fake.Supply(Out(UartBase, (ulong)(i & 0xFF)));
        for (var i = 0; i < DeviceProtocol.WriteWindow; i++) await rig.Uart.ExpectMsgAsync<DeviceProtocol.Write>();
        Assert.False(rig.Fake.InRun);
        var runs = rig.Fake.Runs;

        rig.Vcpu.Tell(Pause.Instance);
        await ExpectNoMsgAsync(Quiet); // waiting for credit: not paused yet

        rig.Vcpu.Tell(new DeviceProtocol.WriteCredit(DeviceProtocol.CreditBatch), rig.Uart.Ref);
        Assert.Equal(new Paused(0), await ExpectMsgAsync<Paused>());
        Assert.Equal(runs, rig.Fake.Runs); // the guest did not run between the credit and the pause
        Assert.Equal(1, rig.Fake.Pending);
    }

    // ---- save ----

    [Fact]
    public async Task Vcpu_must_refuse_to_save_unless_paused()
    {
        var rig = Create();
        rig.Vcpu.Tell(SaveState.Instance);
        var refused = await ExpectMsgAsync<Refused>();
        Assert.Equal(nameof(SaveState), refused.Request);
        Assert.Equal(0, rig.Fake.Saves);
    }

    [Fact]
    public async Task Vcpu_must_save_the_state_it_paused_in_and_resume_there()
    {
        var rig = Create();
        rig.Fake.Supply(VmExit.Hlt.Instance); // IF=1: halted, the VM is not told
        Assert.True(rig.Fake.WaitUntil(f => f.Consumed == 1 && !f.InRun));
        rig.Vcpu.Tell(Pause.Instance);
        await ExpectMsgAsync(new Paused(0));

        rig.Vcpu.Tell(SaveState.Instance);
        var saved = await ExpectMsgAsync<SavedState>();

        Assert.Equal(0, saved.VcpuId);
        Assert.Equal(State.Halted, saved.Snapshot.ResumeIn);
        Assert.Equal(1, rig.Fake.Saves);
        saved.Snapshot.Validate(0);
        rig.Vcpu.Tell(Resume.Instance);
        await ExpectMsgAsync(new Resumed(0));
        rig.Vcpu.Tell(GetStats.Instance);
        Assert.Equal(State.Halted, (await ExpectMsgAsync<Stats>()).State);
    }

    [Fact]
    public async Task Vcpu_must_save_the_vectors_and_nmis_not_yet_given_to_kvm()
    {
        var rig = Create();
        rig.Fake.ReadyForInterruptInjection = false;
        rig.Vcpu.Tell(new InjectInterrupt(0x33));
        rig.Vcpu.Tell(new InjectInterrupt(0x34));
        rig.Vcpu.Tell(Pause.Instance);
        await ExpectMsgAsync(new Paused(0));
        rig.Vcpu.Tell(new VlapicProtocol.NmiPending(0)); // while paused: kept for the next entry

        rig.Vcpu.Tell(SaveState.Instance);
        var saved = (await ExpectMsgAsync<SavedState>()).Snapshot;

        Assert.Equal(State.Running, saved.ResumeIn);
        Assert.Equal(new byte[] { 0x33, 0x34 }, saved.Interrupts.Requested);
        Assert.Equal(1, saved.Interrupts.Nmis);
        Assert.Empty(rig.Fake.Injected);
    }

    // ---- restore ----

    [Fact]
    public async Task Vcpu_built_with_a_snapshot_must_restore_it_on_its_own_thread_at_start_and_sleep_on_until_an_interrupt()
    {
        var rig = Create(start: false, restore: Snapshot(0, State.Halted));
        Assert.Empty(rig.Fake.Restores); // nothing before Start

        rig.Vcpu.Tell(Start.Instance);
        Assert.Equal(new Restored(0, State.Halted), await ExpectMsgAsync<Restored>());
        var (state, thread) = Assert.Single(rig.Fake.Restores);
        Assert.Equal("vcpu-0", thread);
        Assert.Equal(0x1234UL, state.GetRegs().Rip);
        Assert.Equal(3UL, rig.Fake.Cr8); // kvm_run.cr8 holds the guest's TPR for the next entry
        await Task.Delay(Quiet);
        Assert.Equal(0, rig.Fake.Runs); // halted: no guest code until an interrupt
        await rig.Vm.ExpectNoMsgAsync(TimeSpan.Zero); // IF=1: no halt for the VM to count

        rig.Vcpu.Tell(new VlapicProtocol.InterruptPending(0, 0x41, 1), rig.Vlapic.Ref);
        Assert.True(rig.Fake.WaitUntil(f => f.Injected.Count == 1 && f.InRun), "the interrupt did not wake the restored vcpu");
        Assert.Equal(new byte[] { 0x41 }, rig.Fake.Injected);
        Assert.Equal(VlapicProtocol.InterruptAccepted.Of(0x41), await rig.Vlapic.ExpectMsgAsync<VlapicProtocol.InterruptAccepted>());
    }

    [Fact]
    public async Task Vcpu_restored_halted_with_interrupts_disabled_must_tell_the_vm()
    {
        var rig = Create(start: false, restore: Snapshot(0, State.Halted, rflags: 0x2));
        rig.Vcpu.Tell(Start.Instance);
        await ExpectMsgAsync<Restored>();
        Assert.Equal(new VcpuHalted(0), await rig.Vm.ExpectMsgAsync<VcpuHalted>());
        Assert.Equal(0, rig.Fake.Runs);
    }

    [Fact]
    public async Task Vcpu_restored_running_must_inject_what_was_pending_for_it()
    {
        var pending = new PendingInterruptsState([0x35], 1, false, false, 0, 7);
        var rig = Create(start: false, restore: Snapshot(0, State.Running, pending));
        rig.Vcpu.Tell(Start.Instance);
        Assert.Equal(new Restored(0, State.Running), await ExpectMsgAsync<Restored>());
        Assert.True(rig.Fake.WaitUntil(f => f.Injected.Count == 1 && f.NmisInjected == 1 && f.InRun));
        Assert.Equal(new byte[] { 0x35 }, rig.Fake.Injected);
        rig.Vcpu.Tell(GetStats.Instance);
        Assert.Equal(8, (await ExpectMsgAsync<Stats>()).Injected); // the count goes on from the saved one
    }

    [Fact]
    public async Task Vcpu_restored_waiting_for_sipi_must_wait_for_it()
    {
        var rig = Create(id: 1, start: false, restore: Snapshot(1, State.WaitingForSipi));
        rig.Vcpu.Tell(Start.Instance);
        Assert.Equal(new Restored(1, State.WaitingForSipi), await ExpectMsgAsync<Restored>());
        await Task.Delay(Quiet);
        Assert.Equal(0, rig.Fake.Runs);

        rig.Vcpu.Tell(new VlapicProtocol.StartupReceived(1, 0x09));
        Assert.Equal(new StartedBySipi(1, 0x09), await rig.Vm.ExpectMsgAsync<StartedBySipi>());
        Assert.True(rig.Fake.WaitUntilIdleInGuest());
        Assert.Equal((ushort)0x0900, rig.Fake.SpecialRegisters.Cs.Selector);
    }

    [Fact]
    public async Task Vcpu_must_stop_with_a_report_when_its_snapshot_cannot_be_restored()
    {
        var fake = new ScriptedVcpu(0) { RestoreFailure = new KvmException("KVM_SET_XSAVE(vcpu 0)", 22) };
        var rig = Create(start: false, restore: Snapshot(0, State.Running), fake: fake);
        rig.Vcpu.Tell(Start.Instance);
        var stopped = await rig.Vm.ExpectMsgAsync<Stopped>();
        Assert.Equal(StopReason.RestoreFailed, stopped.Reason);
        Assert.Contains("KVM_SET_XSAVE", stopped.Report);
        Assert.Equal(0, rig.Fake.Runs);

        var other = Create(id: 2, start: false, restore: Snapshot(1, State.Running));
        other.Vcpu.Tell(Start.Instance);
        Assert.Contains("vcpu 1", (await other.Vm.ExpectMsgAsync<Stopped>()).Report);
    }
}
