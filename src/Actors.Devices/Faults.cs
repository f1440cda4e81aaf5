namespace ActorVmm.Devices;

/// <summary>
/// Fault injection: messages every VM actor understands so a test (or `actorvmm ctl fault`) can
/// break a live VM on purpose and watch supervision handle it.
/// </summary>
public static class FaultProtocol
{
    public interface IFaultMessage;

    /// <summary>Makes the receiving actor throw <see cref="InjectedFaultException"/> (its supervisor decides).</summary>
    public sealed record Crash(string Reason) : IFaultMessage;
}

/// <summary>The exception an actor throws on <see cref="FaultProtocol.Crash"/>.</summary>
public sealed class InjectedFaultException(string reason) : Exception($"injected fault: {reason}");

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
