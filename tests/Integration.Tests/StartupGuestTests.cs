using Akka.Actor;
using ActorVmm.Host;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Config;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Vm;
using ActorVmm.Testing;
using Iced.Intel;
using Xunit;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Integration.Tests;

/// <summary>
/// A host prepares its VM (KVM, guest memory, vcpus) while its actor system starts, and creates the
/// VM's actors once the system is up; a system that fails to start fails the VM's start with its
/// own error. The guest writes 'A' to COM1 and exits through the debug-exit port with status 0.
/// </summary>
public sealed class StartupGuestTests
{
    private static FlatImage Guest()
    {
        var a = new Assembler(16);
        a.mov(dx, 0x3F8);
        a.mov(al, (byte)'A');
        a.@out(dx, al);
        a.mov(al, 0);
        a.@out(0xF4, al);
        a.cli();
        a.hlt();
        return new FlatImage(GuestCode.Assemble(a, 0x7C00), 0x7C00, 0, 0x7C00);
    }

    [KvmFact]
    public async Task A_vm_prepared_before_its_actor_system_is_up_runs_once_the_system_is_up()
    {
        KvmRequirement.Check();
        var starting = new TaskCompletionSource<ActorSystem>(TaskCreationOptions.RunContinuationsAsynchronously);
        using var console = SerialConsole.Captured();
        var builder = new VmBuilder(starting.Task, new VmSpec("early", 16 << 20, 1, Guest())).WithStandardDevices(console);
        var start = Task.Factory.StartNew(builder.Start, TaskCreationOptions.LongRunning);
        // Without a system there is nothing to create the VM's actors in: Start waits.
        Assert.NotSame(start, await Task.WhenAny(start, Task.Delay(TimeSpan.FromSeconds(1))));

        var system = HostRunner.CreateSystem(VmConfig.Load(null), "startup");
        try
        {
            starting.SetResult(system);
            await using var vm = await start;
            var outcome = await vm.WaitAsync(GuestRun.DefaultTimeout);
            console.Flush();
            Assert.True(outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, outcome.ToString());
            Assert.Equal("A", console.CapturedText());
        }
        finally
        {
            await system.Terminate();
        }
    }

    [KvmFact]
    public void A_vm_whose_actor_system_fails_to_start_fails_with_the_systems_error()
    {
        KvmRequirement.Check();
        var failed = Task.FromException<ActorSystem>(new Akka.Remote.RemoteTransportException("the control port is taken"));
        using var console = SerialConsole.Captured();
        var builder = new VmBuilder(failed, new VmSpec("orphan", 16 << 20, 1, Guest())).WithStandardDevices(console);
        var e = Assert.Throws<Akka.Remote.RemoteTransportException>(() => builder.Start());
        Assert.Equal("the control port is taken", e.Message);
        Assert.Equal(0, console.BytesWritten);
    }
}
